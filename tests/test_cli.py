"""The command lines as a new user meets them: overrides (None, every architecture switch), config
paths from another directory, one-line errors that leave the workdir untouched, --help that
lists the flags and exits 0, and metrics.jsonl without a second record of one kind per step."""

import dataclasses
import json
import os
import subprocess
import sys
import typing

import pytest

from configs import common
from coatnet_jax import metrics
from coatnet_jax import models
from run_module import ROOT

# The trainer's flags and config parsing, with a main that prints the config instead of training.
DUMP = ('from coatnet_jax import cli, main; '
        'cli.run(lambda argv: print(main._CONFIG.value.to_json()), '
        'flags_parser=cli.parse_config_flags)')


def _python(args, cwd, code=None):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  cmd = [sys.executable] + (['-c', code] if code else ['-m']) + list(args)
  return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _dump(tmp_path, *args):
  proc = _python(['x', *args, '--workdir', str(tmp_path / 'unused')], str(tmp_path), code=DUMP)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _other(value, field):
  """A valid value of a switch other than the paper's (timm's where it differs)."""
  timm = getattr(models.TIMM_OPTIONS, field)
  if timm != value:
    return timm
  if isinstance(value, bool):
    return not value
  if isinstance(value, float):
    return value * 2
  if isinstance(value, int):
    return value + 1
  return value


def test_every_switch_and_none_override_from_another_directory(tmp_path):
  """Every models.Options field from the command line (values other than the defaults), None for a
  nullable field, and a relative configs/ path from a directory that has none."""
  defaults = dataclasses.asdict(models.Options())
  want = {k: _other(v, k) for k, v in defaults.items()}
  overrides = [f'--config.model.switches.{k}={v}' for k, v in want.items()]
  config = _dump(tmp_path, '--config', 'configs/in1k.py:variant=coatnet_1',
                 '--config.data.crop_fraction=None', '--config.num_classes=7', *overrides)
  assert config['model']['switches'] == want and config['model']['name'] == 'coatnet_1'
  assert config['data']['crop_fraction'] is None and config['num_classes'] == 7
  models.Options(**want)  # A valid architecture.
  again = _dump(tmp_path, f'--config={os.path.join(ROOT, "configs", "quickstart.py")}',
                '--config.data.crop_fraction=1.0')
  assert again['data']['crop_fraction'] == 1.0 and again['model']['switches']['bn_momentum'] == 0.9


def test_switches_follow_the_options_dataclass():
  """A field another change adds to models.Options is declared with its default, typed even when
  the default is None."""

  @dataclasses.dataclass(frozen=True)
  class Options(models.Options):
    norm_kind: typing.Optional[str] = None
    width_mult: float = 1.0

  switches = common.model_switches(Options)
  assert switches.width_mult == 1.0 and switches.norm_kind is None
  switches.norm_kind = 'rms'  # The reference is typed str: an override parses as one.
  with pytest.raises(TypeError):
    switches.norm_kind = 3
  assert set(switches) == {f.name for f in dataclasses.fields(Options)}


@pytest.mark.parametrize('args,message', [
    (['--config', 'configs/quickstart.py', '--config.optim.lrr=1'],
     'error: unknown config field optim.lrr; did you mean optim.lr?'),
    (['--config', 'configs/quickstart.py', '--config.model.switches.pooll=avg'],
     'error: unknown config field model.switches.pooll; did you mean model.switches.pool?'),
    (['--config', 'configs/in1k.py:variant=coatnet_9'],
     'in1k has recipes for coatnet_0, coatnet_1, coatnet_2, coatnet_3.'),
    (['--config', 'configs/in1k.py:size=big'], 'unknown config argument size; valid: runlocal, '
     'variant.'),
    (['--config', 'configs/finetune.py:res=big'], 'config argument res=big is not a valid int.'),
    (['--config', 'configs/quickstart.py', '--config.batch_size=None'],
     'error: --config.batch_size=None: this field cannot be None'),
    (['--config', 'configs/quickstart.py', '--config.batch_size=big'],
     'error: --config.batch_size=big: '),
    (['--config', 'configs/nope.py'], 'error: no config file configs/nope.py'),
    (['--config', 'configs/quickstart.py', '--workdir='], 'error: --workdir is required'),
])
def test_user_errors_are_one_clean_line_and_touch_nothing(tmp_path, args, message):
  workdir = tmp_path / 'run'
  if not any(a.startswith('--workdir') for a in args):
    args = [*args, '--workdir', str(workdir)]
  proc = _python(['coatnet_jax.main', *args], str(tmp_path))
  assert proc.returncode == 1, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], lines
  assert '\\' not in lines[0] and 'Traceback' not in proc.stderr
  assert not workdir.exists()


# One command per way of parsing flags: cli.parse_config_flags, cli.run with a required flag
# (evaluate, export, import_timm and fit share it), argparse (with TensorFlow imported, without
# timm).
@pytest.mark.parametrize('module', [
    'coatnet_jax.main', 'coatnet_jax.predict', 'coatnet_jax.data.tfrecords',
    'coatnet_jax.data.prepare', 'benchmarks.timm_peer'])
def test_help_lists_the_flags_and_exits_0(tmp_path, module):
  # timm_peer without timm and torch installed: they are hidden from the interpreter.
  code = ("import runpy, sys; sys.modules['timm'] = sys.modules['torch'] = None; "
          f"sys.argv = [{module!r}, '--help']; runpy.run_module({module!r}, run_name='__main__')")
  proc = _python([], str(tmp_path), code=code)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.count('--') >= 2, proc.stdout  # Flag names, with their help.
  noise = ('Unable to initialize backend', 'oneDNN', 'Traceback', 'absl::InitializeLog')
  assert not any(n in proc.stdout + proc.stderr for n in noise), proc.stderr[-2000:]


def test_metrics_jsonl_holds_one_record_per_kind_and_step(tmp_path):
  """A writer opened again (a restart, a finished run started again) never repeats a record."""
  w = metrics.MetricWriter(str(tmp_path), tensorboard=False)
  w.write(0, {'compile_s': 3.0, 'data/skipped_images': 0})
  w.write(5, {'train/loss': 1.0})
  w.write(5, {'eval/top1': 0.5})
  w.close()
  w = metrics.MetricWriter(str(tmp_path), tensorboard=False)
  w.write(5, {'eval/top1': 0.5})  # The finished run's last eval, again.
  w.write(5, {'train/loss': 1.0})
  w.write(6, {'eval/top1': 0.6})
  w.close()
  with open(tmp_path / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  kinds = [(r['step'], metrics.record_kind(r)) for r in records]
  assert len(kinds) == len(set(kinds)) == 4


def test_library_noise_is_left_out_of_the_log():
  import logging  # pylint: disable=g-import-not-at-top
  from coatnet_jax import cli  # pylint: disable=g-import-not-at-top
  quiet = cli._QuietLibraries()  # pylint: disable=protected-access

  def shown(msg, path, level=logging.INFO):
    return quiet.filter(logging.LogRecord('x', level, path, 1, msg, (), None))

  assert not shown("Unable to initialize backend 'tpu': INTERNAL", '/jax/_src/xla_bridge.py')
  assert shown('An NVIDIA GPU may be present on this machine', '/jax/_src/xla_bridge.py',
               logging.WARNING)
  assert not shown('Saving checkpoint', '/site-packages/orbax/checkpoint/manager.py')
  assert not shown('Metadata file does not exist', '/site-packages/orbax/checkpoint/x.py',
                   logging.WARNING)
  assert shown('step 10/20 | loss 1.0', '/coatnet_jax/train.py')
