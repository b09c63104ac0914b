"""The one kind of error a user sees: a ``UserError`` says what is wrong and what to do, on one
line, and is raised before anything is lost. Every command prints it as ``error: <line>`` and
exits 1; anything else is a bug and keeps its traceback."""


def one_line(text) -> str:
  """Any message (or exception) as one line: runs of white space, newlines included, become one
  space."""
  return ' '.join(str(text).split())


class UserError(Exception):
  """A bad config, flag, file, dataset or workdir: each problem names what is wrong and the fix.

  ``UserError(p1, p2, ...)`` carries several problems found at once (``problems``, one line
  each, printed as one ``error:`` line each); its message is them joined.
  """

  def __init__(self, *problems):
    self.problems = [one_line(p) for p in problems]
    super().__init__(' '.join(self.problems))
