"""``python -m MODULE ARGS`` from the repository root on the CPU, for end-to-end tests."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(args, check=True, timeout=1800):
  """Runs ``python -m args...``; with ``check``, a non-zero exit fails with the stderr tail."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run([sys.executable, '-m'] + args, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)
  if check:
    assert proc.returncode == 0, proc.stderr[-5000:]
  return proc
