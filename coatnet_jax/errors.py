"""The one kind of error a user sees: a ``UserError`` says what is wrong and what to do, on one
line, and is raised before anything is lost. Every command prints it as ``error: <line>`` and
exits 1 (``cli.run``); anything else is a bug and keeps its traceback."""


class UserError(Exception):
  """A bad config, flag, file, dataset or workdir: the message names it and the fix."""


def one_line(text) -> str:
  """Any message (or exception) as one line: runs of white space, newlines included, become one
  space."""
  return ' '.join(str(text).split())
