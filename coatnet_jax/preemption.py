"""A run stops cleanly when told to: SIGTERM, Ctrl-C or JAX's preemption notice -> save, wait, exit.

A preempted TPU VM gets SIGTERM (one process) or a preemption notice through JAX's coordination
service (several processes) some seconds before it goes; the loop asks ``reached`` every step and
saves the step it is at, so a rerun of the same command resumes without losing work.
"""

import signal
import threading

from absl import logging
import jax


class Preemption:
  """SIGTERM, Ctrl-C (SIGINT) and JAX's preemption sync point -> save, wait, exit 0.

  One process: a handler sets a flag the loop reads every step; a second Ctrl-C aborts at once
  (KeyboardInterrupt, the last checkpoint kept). Several processes: JAX's preemption service owns
  SIGTERM and ``reached_preemption`` makes every process agree on the step, so they all save the
  same one; Ctrl-C aborts there.
  """

  def __init__(self):
    self.signalled = None  # The name of the signal received, if any.
    self._previous = {}
    # Several processes would each save a different step on their own signal: there, Ctrl-C
    # keeps its default (abort) and SIGTERM goes to JAX's preemption service.
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handler)

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    if signum == signal.SIGINT:
      if self.signalled == 'SIGINT':
        raise KeyboardInterrupt('second Ctrl-C')
      logging.warning('Received Ctrl-C: saving at the end of this step, then exiting (press '
                      'Ctrl-C again to abort at once, losing the steps since the last '
                      'checkpoint).')
    else:
      logging.warning('Received SIGTERM: saving at the end of this step, then exiting.')
    self.signalled = signal.Signals(signum).name

  def reached(self, manager, step: int) -> bool:
    if jax.process_count() > 1:
      return bool(manager.reached_preemption(step))
    return bool(self.signalled)

  def close(self):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}
