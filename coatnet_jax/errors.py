"""The one kind of error a user sees: a ``UserError`` says what is wrong and what to do, on one
line, and is raised before anything is lost. Every command runs inside ``exit_on_user_error``
(``cli.run`` applies it; ``data.prepare``, which parses with argparse, enters it itself): it prints
each problem as ``error: <line>`` on stderr and exits 1; anything else is a bug and keeps its
traceback.

Pure Python on purpose: the data modules, the checkpoint code and the commands all import it, and
it must load before TensorFlow, JAX or absl do.
"""

import contextlib
import os
import re
import sys


def one_line(text, limit: int = 0) -> str:
  """Any message (or exception) as one line: runs of white space, newlines included, become one
  space; with ``limit``, longer text is cut there and ends in ' ...'."""
  text = ' '.join(str(text).split())
  return text[:limit] + ' ...' if limit and len(text) > limit else text


def describe(e: BaseException) -> str:
  """A foreign exception (OS, Orbax, TensorStore, torch) on one line: its OS error first, where it
  has one (TensorStore buries it at the end of a long message), then its type and message."""
  text = one_line(f'{type(e).__name__}: {e}')
  code = getattr(e, 'errno', None)
  if code is None:
    found = re.search(r"os_error_code='(\d+)'", text)
    code = int(found.group(1)) if found else None
  prefix = f'{os.strerror(code)} (errno {code}): ' if code else ''
  return prefix + one_line(text, limit=400)


class UserError(Exception):
  """A bad config, flag, file, dataset or workdir: each problem names what is wrong and the fix.

  ``UserError(p1, p2, ...)`` carries several problems found at once (``problems``, one line
  each, printed as one ``error:`` line each); its message is them joined.
  """

  def __init__(self, *problems):
    self.problems = [one_line(p) for p in problems]
    super().__init__(' '.join(self.problems))


def print_problems(e: BaseException) -> None:
  """``error: <line>`` on stderr for each problem of ``e`` (its message, for a foreign exception
  a command treats as the user's; its type name where the message is empty)."""
  problems = e.problems if isinstance(e, UserError) else [one_line(e)]
  problems = [p for p in problems if p] or [type(e).__name__]
  sys.stdout.flush()
  sys.stderr.write(''.join(f'error: {p}\n' for p in problems))
  sys.stderr.flush()


@contextlib.contextmanager
def exit_on_user_error(*also):
  """Ends the process with ``print_problems`` and exit status 1 on a ``UserError``, or on one of
  ``also``: the library exceptions (``ValueError``, ``OSError``, ...) a command counts as bad
  input, so that its ``main`` needs no try/except of its own."""
  try:
    yield
  except (UserError,) + tuple(also) as e:
    print_problems(e)
    sys.exit(1)
