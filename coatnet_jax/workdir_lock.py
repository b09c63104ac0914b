"""One run per workdir: an exclusive ``flock`` on ``WORKDIR/run.lock``, held for the whole run.

The kernel drops the lock when its process ends in any way (``kill -9`` and a crash included),
so a lock is never stale: the next start takes it and resumes. The file stays and names the last
holder (host, pid, start time, command); a second start while the holder lives is refused in one
line naming it. Only process 0 of a multi-process run takes the lock.

Object storage (``gs://``, ``s3://``, any path with ``://``) has no file locks: there the lock is
skipped with a warning, and keeping to one run per workdir is the user's job (README).
"""

import fcntl
import json
import os
import socket
import sys
import time
from typing import Optional

from absl import logging

from coatnet_jax import errors

LOCK_FILE = 'run.lock'


class WorkdirBusyError(errors.UserError):
  """Another live process holds the workdir; the message is one line naming it."""


def _unlockable(workdir: str) -> bool:
  return '://' in workdir


def _holder(f) -> str:
  f.seek(0)
  try:
    h = json.loads(f.read() or '{}')
  except ValueError:
    return 'an unknown process'
  return (f'pid {h.get("pid")} on host {h.get("host")}, started {h.get("started")} '
          f'({h.get("command", "")[:120]})')


def _busy(workdir: str, f) -> WorkdirBusyError:
  return WorkdirBusyError(
      f'Workdir {workdir} is in use by another run: {_holder(f)}. Wait for it to end, stop it, or '
      f'use another --workdir.')


def check_free(workdir: str) -> None:
  """Refuses a workdir another live run holds, without creating or changing anything."""
  path = os.path.join(workdir, LOCK_FILE)
  if _unlockable(workdir) or not os.path.exists(path):
    return
  try:
    f = open(path, 'r')  # pylint: disable=consider-using-with
  except OSError:
    return
  with f:
    try:
      fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
      raise _busy(workdir, f) from None
    fcntl.flock(f, fcntl.LOCK_UN)


class WorkdirLock:
  """Held from ``acquire`` to ``release`` (or the end of the process)."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self._file = None

  def acquire(self) -> 'WorkdirLock':
    if _unlockable(self.workdir):
      logging.warning('Workdir %s is on object storage, which has no file locks: nothing stops '
                      'a second run from sharing it; start one run per workdir.', self.workdir)
      return self
    os.makedirs(self.workdir, exist_ok=True)
    f = open(os.path.join(self.workdir, LOCK_FILE), 'a+')  # pylint: disable=consider-using-with
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      error = _busy(self.workdir, f)
      f.close()
      raise error from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({'host': socket.gethostname(), 'pid': os.getpid(),
                        'started': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
                        'command': ' '.join(sys.argv)}) + '\n')
    f.flush()
    self._file = f
    return self

  def release(self) -> None:
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


def acquire(workdir: str, process_index: int = 0) -> Optional[WorkdirLock]:
  return WorkdirLock(workdir).acquire() if process_index == 0 else None
