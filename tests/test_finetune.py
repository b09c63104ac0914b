"""Fine-tuning from a pre-trained checkpoint, the timm import, and exact evaluation at any size.

The proof runs the real entry points on the quickstart's digits: pre-train coatnet_pico at 32 px,
evaluate it at 64 px, fine-tune it at 64 px through configs/finetune.py, and require the fine-tuned
model to be at least as accurate at 64 px as the pre-trained one. Independent references: torch's
bilinear resize for the tables, timm's state dict for the import, the trainer's own eval for
``evaluate`` at the training size.
"""

import json
import os
import shutil

import flax
import jax
import numpy as np
import pytest

from configs import finetune
from configs import quickstart
from coatnet_jax import checkpointing
from coatnet_jax import pretrained
from coatnet_jax import config_checks
from coatnet_jax import errors
from coatnet_jax import steps
from run_module import run_module as _run


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _flat(tree):
  return {'/'.join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree).items()}


def _torch_bilinear(table, height, width):
  import torch  # pylint: disable=g-import-not-at-top
  t = torch.from_numpy(np.asarray(table, np.float64))[None]
  return torch.nn.functional.interpolate(t, size=(height, width), mode='bilinear',
                                         align_corners=False)[0].numpy()


@pytest.fixture(scope='module')
def pretrain(tmp_path_factory):
  """quickstart:smoke: coatnet_pico pre-trained on digits at 32 px for 80 steps."""
  workdir = str(tmp_path_factory.mktemp('pretrain'))
  cache = str(tmp_path_factory.mktemp('xla_cache'))
  _run(['coatnet_jax.main', '--config', 'configs/quickstart.py:smoke', '--workdir', workdir,
        f'--config.compilation_cache_dir={cache}'])
  return workdir, cache


def _evaluate(workdir, *flags):
  proc = _run(['coatnet_jax.evaluate', '--workdir', workdir, *flags])
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_evaluate_matches_the_runs_own_eval(pretrain):
  workdir, _ = pretrain
  own = _metrics(workdir)[-1]
  got = _evaluate(workdir)
  assert got['step'] == 80 and got['res'] == 32 and got['count'] == 359
  assert got['top1'] == own['eval/top1'] and abs(got['loss'] - own['eval/loss']) < 1e-5
  # --dtype computes in another dtype than the run's float32: close, not equal.
  bf16 = _evaluate(workdir, '--dtype', 'bfloat16')
  assert bf16['count'] == 359 and abs(bf16['top1'] - got['top1']) < 0.02
  assert bf16['loss'] != got['loss']


def test_finetune_at_64_beats_the_pretrained_model_at_64_and_resumes_from_itself(
    pretrain, tmp_path):
  workdir, cache = pretrain
  before = _evaluate(workdir, '--res', '64')
  assert before['res'] == 64 and before['count'] == 359

  ft = str(tmp_path / 'finetune')
  args = ['coatnet_jax.main', '--config', f'configs/finetune.py:init={workdir},res=64,data=digits',
          '--workdir', ft, '--config.total_steps=100', '--config.checkpoint_every_steps=50',
          f'--config.compilation_cache_dir={cache}']
  proc = _run(args)
  assert 'Fine-tuning from' in proc.stderr and 'Resized 3 relative-bias tables' in proc.stderr
  after = [r for r in _metrics(ft) if 'eval/top1' in r][-1]
  print(f'top-1 at 64 px: pre-trained {before["top1"]:.4f}, fine-tuned {after["eval/top1"]:.4f}')
  assert after['step'] == 100 and after['eval/count'] == 359
  assert after['eval/top1'] >= before['top1']
  assert json.load(open(os.path.join(ft, 'config.json')))['data']['crop_fraction'] is None

  # Stopped and restarted (longer): it resumes from its own step 100, init is never read again.
  moved = workdir + '_moved'
  shutil.move(workdir, moved)
  try:
    proc = _run(args[:5] + ['--config.total_steps=110'] + args[7:])
  finally:
    shutil.move(moved, workdir)
  assert 'Restored step 100' in proc.stderr and 'Fine-tuning from' not in proc.stderr
  assert [r['step'] for r in _metrics(ft) if 'eval/top1' in r] == [100, 110]


def _pico_checkpoint(path, num_classes, size=32):
  c = quickstart.get_config()
  c.data.image_size = size
  model = steps.build_model(c, num_classes)
  variables = model.init(jax.random.key(3), np.zeros((1, size, size, 3), np.float32))
  params = jax.tree.map(lambda x: x + 0.1 * np.random.default_rng(0).standard_normal(x.shape,
                                                                                     np.float32),
                        variables['params'])
  variables = {'params': params, 'batch_stats': variables['batch_stats']}
  checkpointing.save_variables(path, c, variables, num_classes)
  return c, variables


def test_adapt_resizes_tables_bilinearly_and_replaces_the_head(tmp_path):
  c, variables = _pico_checkpoint(str(tmp_path / 'src'), 10)
  pre = pretrained.read(str(tmp_path / 'src'))
  assert pre.step == 0 and pre.weights == 'params' and pre.num_classes == 10

  same = pretrained.adapt(pre, steps.build_model(c, 10), 32, 10)
  for k, v in _flat(variables).items():
    np.testing.assert_array_equal(_flat(same)[k], v)

  c.data.image_size = 48
  out = _flat(pretrained.adapt(pre, steps.build_model(c, 4), 48, 4))
  src = _flat(variables)
  tables = [k for k in src if k.endswith('relative_bias')]
  assert len(tables) == 3
  for k in tables:  # (heads, 2H-1, 2W-1): 2x2 -> 3x3 tokens in S4, 4x4 -> 6x6 in S3.
    h, w = out[k].shape[1:]
    assert out[k].shape != src[k].shape
    np.testing.assert_allclose(out[k], _torch_bilinear(src[k], h, w), rtol=1e-5, atol=1e-6)
  assert out['params/classifier/kernel'].shape == (src['params/classifier/kernel'].shape[0], 4)
  assert not out['params/classifier/kernel'].any() and not out['params/classifier/bias'].any()
  for k, v in src.items():
    if k not in tables and 'classifier' not in k:
      np.testing.assert_array_equal(out[k], v)


def test_bad_init_sources_are_one_line_errors_before_anything_is_written(tmp_path):
  _pico_checkpoint(str(tmp_path / 'src'), 10)
  workdir = str(tmp_path / 'run')
  c = finetune.get_config(f'init={tmp_path / "nowhere"},res=64,data=digits')
  with pytest.raises(errors.UserError, match='holds no checkpoints'):
    config_checks.check_inputs(c, workdir)
  c = finetune.get_config(f'init={tmp_path / "src"},res=64,data=digits')
  c.model.switches.pool = 'avg'
  with pytest.raises(errors.UserError, match="switches differ.*'pool'"):
    config_checks.check_inputs(c, workdir)
  c = finetune.get_config(f'init={tmp_path / "src"},res=64,data=digits')
  config_checks.check_inputs(c, workdir)  # The same model at another size and momentum is accepted.
  assert not os.path.exists(workdir)

  proc = _run(['coatnet_jax.main', '--config',
               f'configs/finetune.py:init={tmp_path / "nowhere"},data=digits',
               '--workdir', workdir], check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith('error: ') and 'nowhere' in proc.stderr
  assert not os.path.exists(workdir)


def test_finetune_recipe_follows_table_10():
  c = finetune.get_config('init=/x,res=384,source=in21k,variant=coatnet_2')
  assert (c.batch_size, c.num_epochs, c.optim.lr, c.optim.schedule) == (1024, 30.0, 5e-5,
                                                                        'constant')
  assert (c.optim.warmup_steps, c.optim.weight_decay, c.optim.clip_norm) == (0, 1e-8, 1.0)
  assert (c.ema.decay, c.loss.kind, c.loss.label_smoothing) == (0.9999, 'softmax', 0.1)
  assert c.data.image_size == 384 and c.data.crop_fraction is None and c.init.path == '/x'
  assert c.model.drop_path_rate == 0.3 and c.loss.mixup_alpha == 0.0
  c = finetune.get_config('init=/x,res=512,source=in1k,variant=coatnet_3')
  assert (c.batch_size, c.loss.mixup_alpha, c.model.drop_path_rate) == (512, 0.8, 0.7)
  assert (c.data.randaugment.num_layers, c.data.randaugment.magnitude) == (2, 20)
  with pytest.raises(ValueError, match='recipes for'):
    finetune.get_config('init=/x,source=in21k,variant=coatnet_0')


def test_import_timm_writes_a_checkpoint_that_init_accepts(tmp_path):
  torch = pytest.importorskip('torch')
  timm = pytest.importorskip('timm')
  safetensors_torch = pytest.importorskip('safetensors.torch')
  from coatnet_jax import convert  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = timm.create_model('coatnet_0_224', num_classes=7).eval()
  weights = str(tmp_path / 'c0.safetensors')
  safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)

  out = str(tmp_path / 'imported')
  proc = _run(['coatnet_jax.tools.import_timm', '--model', 'coatnet_0_224', '--weights', weights,
               '--out', out])
  assert 'timm' in proc.stdout
  pre = pretrained.read(out)
  assert pre.metadata['model'] == 'coatnet_0' and pre.num_classes == 7
  assert pre.config.model.dtype == 'float32'  # Evaluated as timm computes, unless --dtype says.
  _, want = convert.from_timm({k: v.numpy() for k, v in model.state_dict().items()},
                              'coatnet_0_224')
  got, want = _flat(pre.variables), _flat(want)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])

  # A fine-tune config accepts it with :timm, and names :timm when it is left out.
  def expected(arg):
    return checkpointing.make_metadata(finetune.get_config(arg), pre.num_classes, 0)

  pretrained.check_compatible(pre.metadata, expected(f'init={out},timm,variant=coatnet_0'), out)
  with pytest.raises(pretrained.InitError, match=':timm'):
    pretrained.check_compatible(pre.metadata, expected(f'init={out}'), out)

  again = _run(['coatnet_jax.tools.import_timm', '--model', 'coatnet_0_224', '--weights',
                weights, '--out', out], check=False)
  assert again.returncode == 1 and 'already holds checkpoints' in again.stderr
  bad = _run(['coatnet_jax.tools.import_timm', '--model', 'coatnet_5_224', '--weights',
              weights, '--out', str(tmp_path / 'c5')], check=False)
  assert bad.returncode == 1 and 'channels per head' in bad.stderr


def test_predict_on_digit_files_agrees_with_the_runs_eval_on_every_example(pretrain, tmp_path):
  """The quickstart's 359 test digits as 8x8 PNG files through export + predict: the archive
  records the run's eval transform (nearest upsampling, no crop), so every prediction is the
  run's own, and their accuracy is the run's logged eval/top1."""
  from coatnet_jax.data import digits as digits_source  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  workdir, cache = pretrain
  archive = str(tmp_path / 'digits.zip')
  _run(['coatnet_jax.tools.export', '--workdir', workdir, '--out', archive, '--platforms', 'cpu'])
  # The test split's original 8x8 digits (values 0..16 -> 0..255), identified by their pixels.
  digits = datasets.load_digits()
  eight = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  images32, labels = digits_source.arrays(32, 'test')
  by_pixels = {e.tobytes(): e for e in eight}
  paths = []
  for i, image in enumerate(images32):
    small = by_pixels[image[::4, ::4, 0].tobytes()]
    paths.append(str(tmp_path / f'digit_{i:03d}.png'))
    Image.fromarray(small, 'L').save(paths[-1])
  proc = _run(['coatnet_jax.predict', '--model', archive, '--json', '--top', '1',
               '--batch_size', '120', *paths])
  predicted = [json.loads(l)['top'][0]['index'] for l in proc.stdout.splitlines() if l.strip()]
  # The run's own eval, example by example: its model on the eval pipeline's images.
  pre = pretrained.read(workdir)
  model = steps.build_model(pre.config, pre.num_classes)
  logits = model.apply(pre.variables, steps.normalize(images32), train=False)
  np.testing.assert_array_equal(predicted, np.argmax(np.asarray(logits), -1))
  logged = [r for r in _metrics(workdir) if 'eval/top1' in r][-1]
  assert np.sum(np.asarray(predicted) == labels) == round(logged['eval/top1'] * len(labels))


def test_a_finished_run_started_again_logs_no_step_twice(pretrain, tmp_path):
  """The same command on a finished workdir: it restores the last step, evaluates it again, and
  metrics.jsonl still holds one record of each kind per step."""
  from coatnet_jax import metrics  # pylint: disable=g-import-not-at-top
  workdir, cache = pretrain
  copy = str(tmp_path / 'again')
  shutil.copytree(workdir, copy)
  before = _metrics(copy)
  _run(['coatnet_jax.main', '--config', 'configs/quickstart.py:smoke', '--workdir', copy,
        f'--config.compilation_cache_dir={cache}'])
  after = _metrics(copy)
  kinds = [(r['step'], metrics.record_kind(r)) for r in after]
  assert len(kinds) == len(set(kinds))
  assert [r for r in after if 'eval/top1' in r] == [r for r in before if 'eval/top1' in r]


def test_readme_restores_a_checkpoint_with_plain_orbax(pretrain, tmp_path):
  """The README's snippet, run where this package cannot be imported, on the run's last step."""
  import re  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  workdir, _ = pretrain
  with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), 'README.md')) as f:
    readme = f.read()
  section = readme[readme.index('### Restore a checkpoint with plain Orbax'):]
  code = re.search(r'```python\n(.*?)```', section, re.S).group(1)
  code = code.replace('WORKDIR/checkpoints/STEP', os.path.join(workdir, 'checkpoints', '80'))
  code = "import sys; sys.modules['coatnet_jax'] = None\n" + code
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  proc = subprocess.run([sys.executable, '-c', code], cwd=str(tmp_path), capture_output=True,
                        text=True, timeout=300, env=dict(env, JAX_PLATFORMS='cpu'), check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  model, step, size = proc.stdout.split()
  pre = pretrained.read(workdir)
  want = sum(np.size(x) for x in jax.tree.leaves(pre.variables['params']))
  assert (model, int(step), int(size)) == ('coatnet_pico', 80, want)
