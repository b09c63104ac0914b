"""Entry point: ``python -m coatnet_jax.main --config configs/FILE.py[:ARGS] --workdir DIR``.

Flags only: start the distributed runtime when several processes run, turn on the persistent
compilation cache (a restart does not compile again), then hand over to ``train``. Errors the
user must act on (bad config, model, dataset or workdir; a failed save; a NaN) end the process with
one ``error: ...`` line and exit status 1, never a traceback.
"""

import os
import sys

from absl import flags
from absl import logging
from coatnet_jax import cli  # pylint: disable=g-bad-import-order  (first: quiet start-up)
import jax
from ml_collections import config_flags

from coatnet_jax import checkpointing
from coatnet_jax import errors
from coatnet_jax import pretrained
from coatnet_jax import train

# Errors the user must act on: one line on stderr and exit status 1, never a traceback.
_ONE_LINE_ERRORS = (errors.UserError, train.NonFiniteLossError, checkpointing.CheckpointError,
                    pretrained.InitError, OSError)

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'A configs/*.py file, optionally with ":ARGS"; override fields with '
    '--config.a.b=VALUE.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and logs go here.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, for multi-process runs that no cluster '
    'environment (TPU, SLURM, ...) describes; with --num_processes and --process_id.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in a manual start.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, in a manual start.')
flags.mark_flags_as_required(['config', 'workdir'])


def _multi_process() -> bool:
  """True on multi-host TPU slices and under SLURM / explicit coordinator settings."""
  return bool(os.environ.get('JAX_COORDINATOR_ADDRESS')
              or int(os.environ.get('SLURM_NTASKS', '1')) > 1
              or ',' in os.environ.get('TPU_WORKER_HOSTNAMES', ''))


def _compilation_cache(config):
  cache_dir = config.get('compilation_cache_dir')
  if cache_dir is None:
    cache_dir = os.path.join(os.path.expanduser('~'), '.cache', 'coatnet_jax', 'xla')
  if cache_dir:
    jax.config.update('jax_compilation_cache_dir', cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
    logging.info('Persistent compilation cache: %s', cache_dir)


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {" ".join(argv[1:])}; flags are --config, --workdir, '
             f'--config.a.b=VALUE.')
  if not _WORKDIR.value:
    cli.fail('--workdir is required; see --help.')
  config = _CONFIG.value
  if _NUM_PROCESSES.value and _NUM_PROCESSES.value > 1:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _multi_process():
    jax.distributed.initialize()  # Cluster auto-detection: TPU VM slices, SLURM, ...
  _compilation_cache(config)
  logging.info('Process %d of %d; %d local / %d global devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  try:
    train.train_and_evaluate(config, _WORKDIR.value)
  except _ONE_LINE_ERRORS as e:
    message = ' '.join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError):
      message = checkpointing.one_line(e)
    if isinstance(e, checkpointing.CheckpointError):
      # Orbax's writer threads of a failed save may never end: do not wait for them at exit.
      sys.stdout.flush()
      sys.stderr.write(f'error: {message}\n')
      sys.stderr.flush()
      os._exit(1)  # pylint: disable=protected-access
    problems = getattr(e, 'problems', None)  # config_checks: every problem, one line each.
    if problems:
      sys.stderr.write(''.join(f'error: {" ".join(p.split())}\n' for p in problems[:-1]))
      message = ' '.join(problems[-1].split())
    sys.exit(f'error: {message}')
  except KeyboardInterrupt:  # A second Ctrl-C (the first saves and exits), or one before the loop.
    sys.exit(f'error: interrupted by Ctrl-C; the newest complete checkpoint is step '
             f'{checkpointing.latest_complete_step(_WORKDIR.value)}. Rerun the same command to '
             f'resume from it.')


def run():
  cli.run(main, flags_parser=cli.parse_config_flags)


if __name__ == '__main__':
  run()
