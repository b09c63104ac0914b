"""Entry point: ``python -m coatnet_jax.main --config configs/FILE.py[:ARGS] --workdir DIR``.

Flags only: start the distributed runtime when several processes run, turn on the persistent
compilation cache (a restart does not compile again), then hand over to ``train``. Errors the
user must act on (bad config, model, dataset or workdir; a failed save; a NaN) end the process with
``error: ...`` lines (one per problem) and exit status 1, never a traceback (``errors``).
"""

import os

from absl import flags
from absl import logging
from coatnet_jax import cli  # pylint: disable=g-bad-import-order  (first: quiet start-up)
import jax
from ml_collections import config_flags

from coatnet_jax import checkpointing
from coatnet_jax import errors
from coatnet_jax import train

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
  cache_dir = config.compilation_cache_dir
  if cache_dir is None:
    cache_dir = os.path.join(os.path.expanduser('~'), '.cache', 'coatnet_jax', 'xla')
  if cache_dir:
    jax.config.update('jax_compilation_cache_dir', cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
    logging.info('Persistent compilation cache: %s', cache_dir)


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments {" ".join(argv[1:])}; flags are --config, '
                           f'--workdir, --config.a.b=VALUE.')
  if not _WORKDIR.value:
    raise errors.UserError('--workdir is required; see --help.')
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
  except checkpointing.CheckpointError as e:
    # Orbax's writer threads of a failed save may never end: do not wait for them at exit.
    errors.print_problems(e)
    os._exit(1)  # pylint: disable=protected-access
  except errors.UserError:
    raise
  except OSError as e:  # A workdir or dataset the OS refuses (permissions, a full disk, ...).
    raise errors.UserError(errors.describe(e)) from e
  except FloatingPointError as e:  # A non-finite loss or update: the message says what to do.
    raise errors.UserError(e) from e
  except KeyboardInterrupt:  # A second Ctrl-C (the first saves and exits), or one before the loop.
    raise errors.UserError(
        f'interrupted by Ctrl-C; the newest complete checkpoint is step '
        f'{checkpointing.latest_complete_step(_WORKDIR.value)}. Rerun the same command to resume '
        f'from it.') from None


def run():
  cli.run(main, flags_parser=cli.parse_config_flags)


if __name__ == '__main__':
  run()
