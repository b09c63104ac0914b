"""tools.export and predict end to end: a coatnet_pico checkpoint at 32 px exported at 48 px.

The references are computed in this process with the model itself (``model.apply`` on the adapted
variables) and the eval transform, and compared with what the exported artifact and the
``predict`` command (subprocesses, as a user runs them) give.
"""

import functools
import json
import os
import subprocess
import sys
import zipfile

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import quickstart
from coatnet_jax import checkpointing
from coatnet_jax import models
from coatnet_jax import predict
from coatnet_jax import pretrained
from coatnet_jax import steps
from coatnet_jax.tools import export
import hostile_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ['cat', 'dog', 'eel']
RES = 48


def _run(*args, cache=None):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  if cache:  # The second predict run reuses the first one's compilation.
    env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  return subprocess.run([sys.executable, '-m', *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300, check=False)


def _error_lines(stderr):
  return [l for l in stderr.splitlines() if l.startswith('error:')]


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """(workdir, archive path) of a random pico (noisy, so outputs differ by class) exported at 48."""
  root = tmp_path_factory.mktemp('export')
  c = quickstart.get_config()
  c.data.name = 'imagenet2012'  # A run with the pre-training eval protocol: crop 0.875, bicubic.
  model = steps.build_model(c, len(NAMES))
  # Random values of the model's shapes (no compilation): scales near 1, running variances > 0.
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  rng = np.random.default_rng(0)

  def value(path, a):
    name = path[-1].key
    x = rng.normal(0, 0.1, a.shape).astype(np.float32)
    return np.abs(x) + 1 if name in ('scale', 'var') else x

  variables = jax.tree_util.tree_map_with_path(value, shapes)
  workdir = str(root / 'run')
  checkpointing.save_variables(workdir, c, variables, len(NAMES), class_names=NAMES)
  out = str(root / 'pico.zip')
  r = _run('coatnet_jax.tools.export', '--workdir', workdir, '--res', str(RES), '--out', out)
  assert r.returncode == 0, r.stderr[-3000:]
  assert sorted(os.listdir(root)) == ['pico.zip', 'run']  # No temporary file left.
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask  # As any file the user writes.
  return workdir, out


@pytest.fixture(scope='module')
def reference(exported):
  """The in-process inference function (jitted) and the adapted variables at RES."""
  workdir, _ = exported
  pre = pretrained.read(workdir)
  config = pre.config
  config.data.image_size = RES
  model = steps.build_model(config, pre.num_classes)
  variables = pretrained.adapt(pre, model, RES, pre.num_classes)

  @jax.jit
  def fn(v, images):
    logits = model.apply(v, steps.normalize(images, jnp.float32), train=False)
    return jax.nn.softmax(logits, axis=-1)

  return pre, variables, fn


def test_exported_function_matches_model_for_two_batch_sizes(exported, reference):
  pre, variables, fn = reference
  meta, artifact, stored = predict.load(exported[1])
  assert meta['class_names'] == NAMES and meta['res'] == RES and meta['num_classes'] == 3
  assert meta['model'] == 'coatnet_pico' and meta['output'] == 'softmax' and meta['step'] == 0
  assert meta['crop_fraction'] == 0.875 and meta['eval_resize_method'] == 'bicubic'
  assert meta['weights'] == pre.weights and meta['jax_version'] == jax.__version__
  assert os.path.samefile(meta['workdir'], exported[0])
  assert set(artifact.platforms) == set(meta['platforms']) == {'cpu', 'cuda', 'tpu'}
  # The variables are stored beside the function, resized to 48 px (the tables grew).
  flat_saved = flax.traverse_util.flatten_dict(pre.variables['params'])
  flat = flax.traverse_util.flatten_dict(stored['params'])
  assert any(flat[k].shape != flat_saved[k].shape for k in flat if k[-1] == 'relative_bias')
  # BatchNorm folded into the convolutions (models/fold.py); outputs checked against the unfolded
  # model below.
  folded = models.fold_batchnorm(steps.build_model(pre.config, pre.num_classes), variables)
  jax.tree.map(np.testing.assert_array_equal, stored, jax.tree.map(np.asarray, folded))
  # An argument, not constants: the serialised function is far smaller than the variables.
  n_bytes = sum(a.nbytes for a in jax.tree.leaves(stored))
  assert len(artifact.serialize()) < n_bytes / 2
  images = np.random.default_rng(1).integers(0, 256, (3, RES, RES, 3), dtype=np.uint8)
  want = np.asarray(fn(variables, images))  # Per example (eval mode): any batch gives the same.
  assert want.max() - want.min() > 0.05  # Not a uniform output: the classes are told apart.
  for batch in (3, 1):  # One artifact, two batch sizes.
    got = np.asarray(artifact.call(stored, images[:batch]))
    assert got.shape == (batch, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want[:batch], atol=1e-5, rtol=0)
  # predict's batching: calls of 2, the last one padded.
  np.testing.assert_allclose(predict.predict(artifact, stored, images, batch_size=2), want,
                             atol=1e-5, rtol=0)


def _write_images(directory):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  files = {}
  for name, (h, w), encode in [('wide.jpg', (40, 70), tf.io.encode_jpeg),
                               ('tall.png', (90, 50), tf.io.encode_png),
                               ('jpeg_named.png', (64, 64), tf.io.encode_jpeg)]:
    # Smooth images (random low-res upsampled), so that JPEG keeps their content.
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3)).astype(np.float32)
    image = tf.image.resize(small, (h, w), 'bilinear').numpy().round().astype(np.uint8)
    path = os.path.join(directory, name)
    with open(path, 'wb') as f:
      f.write(encode(image).numpy())
    files[name] = path
  return list(files.values())


def test_predict_prints_class_names_and_probabilities(exported, reference, tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from coatnet_jax.data import transforms  # pylint: disable=g-import-not-at-top
  _, variables, fn = reference
  paths = _write_images(str(tmp_path))
  # The eval input pipeline's way: the transform traced in a tf.data map over the file bytes.
  ds = tf.data.Dataset.from_tensor_slices([tf.io.read_file(p) for p in paths]).map(
      lambda b: transforms.eval_image(b, RES, 0.875, 'bicubic')).batch(len(paths))
  images = next(iter(ds)).numpy()
  want = np.asarray(fn(variables, images))

  r = _run('coatnet_jax.predict', '--model', exported[1], '--json', *paths,
           cache=str(tmp_path / 'cache'))
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(l) for l in r.stdout.splitlines() if l.strip()]
  assert [row['path'] for row in rows] == paths
  for row, p in zip(rows, want):
    assert [t['rank'] for t in row['top']] == [1, 2, 3]
    assert [t['class'] for t in row['top']] == [NAMES[i] for i in np.argsort(-p)]
    for t in row['top']:
      assert t['class'] == NAMES[t['index']]
      assert abs(t['probability'] - p[t['index']]) < 1e-4

  r = _run('coatnet_jax.predict', '--model', exported[1], *paths, cache=str(tmp_path / 'cache'))
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.splitlines()
  assert len(lines) == 4 * len(paths)
  for i, (path, p) in enumerate(zip(paths, want)):
    block = lines[4 * i:4 * i + 4]
    assert block[0] == path
    for rank, (line, k) in enumerate(zip(block[1:], np.argsort(-p)), 1):
      head, name, prob = line.split()
      assert line.startswith('  ') and head == f'{rank}.' and name == NAMES[k]
      assert abs(float(prob) - p[k]) < 1e-4


def test_errors_are_one_line_and_leave_nothing(exported, tmp_path):
  junk = tmp_path / 'notes.jpg'
  junk.write_text('not an image\n')
  good = _write_images(str(tmp_path))[0]
  r = _run('coatnet_jax.predict', '--model', exported[1], good, str(junk))
  assert r.returncode == 1 and r.stdout == ''
  errors = _error_lines(r.stderr)
  assert len(errors) == 1 and str(junk) in errors[0], r.stderr[-2000:]

  with pytest.raises(predict.PredictError, match='notes.jpg is not a readable'):
    predict.load(str(junk))

  # --out under a plain file: unwritable even for root.
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  before = sorted(os.listdir(tmp_path))
  r = _run('coatnet_jax.tools.export', '--workdir', exported[0], '--out', str(blocker / 'm.zip'))
  assert r.returncode == 1
  errors = _error_lines(r.stderr)
  assert len(errors) == 1 and str(blocker / 'm.zip') in errors[0], r.stderr[-2000:]
  # No checkpoint: one line, and no temporary file left beside --out.
  r = _run('coatnet_jax.tools.export', '--workdir', str(tmp_path / 'empty'), '--out',
           str(tmp_path / 'm.zip'))
  assert r.returncode == 1
  errors = _error_lines(r.stderr)
  assert len(errors) == 1 and 'no checkpoints' in errors[0], r.stderr[-2000:]
  assert sorted(os.listdir(tmp_path)) == before


def test_failed_write_keeps_the_old_archive(tmp_path):
  out = tmp_path / 'm.zip'
  out.write_bytes(b'old')
  with pytest.raises(Exception):
    export.write_archive(str(out), b'x', {'a': object()}, {'res': 1})
  assert out.read_bytes() == b'old' and os.listdir(tmp_path) == ['m.zip']


def test_export_computes_in_the_dtype_asked_for(exported, reference):
  """--dtype bfloat16 on a float32 run: the probabilities to bfloat16 precision, not bitwise."""
  pre, variables, fn = reference
  serialized, stored, meta = export.export(pretrained.read(exported[0]), RES, ['cpu'], 'bfloat16')
  assert meta['dtype'] == 'bfloat16'
  images = np.random.default_rng(3).integers(0, 256, (2, RES, RES, 3), dtype=np.uint8)
  got = np.asarray(jax.export.deserialize(bytearray(serialized)).call(stored, images))
  want = np.asarray(fn(variables, images))
  np.testing.assert_allclose(got, want, atol=0.05)
  assert not np.array_equal(got, want)


def _rezip(src, dst, meta=None, members=None, compress=zipfile.ZIP_STORED):
  """A copy of archive ``src`` with ``meta`` (bytes or JSON value) and other members replaced."""
  with zipfile.ZipFile(src) as z:
    files = {n: z.read(n) for n in z.namelist()}
  if meta is not None:
    files['meta.json'] = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
  files.update(members or {})
  with zipfile.ZipFile(dst, 'w') as z:
    for name, data in files.items():
      z.writestr(name, data, compress if name == 'meta.json' else zipfile.ZIP_STORED)
  return str(dst)


def test_hostile_archives_are_one_line(exported, tmp_path):
  from coatnet_jax.data import image_limits  # pylint: disable=g-import-not-at-top
  archive = exported[1]
  with zipfile.ZipFile(archive) as z:
    meta = json.loads(z.read('meta.json'))
    blob = z.read('exported.bin')
  assert set(meta['sha256']) == {'exported', 'variables'}
  flipped = bytearray(blob)
  flipped[len(blob) // 2] ^= 0x10
  cases = [
      (dict(meta=[1, 2]), 'holds a list, not an object'),
      (dict(meta={k: v for k, v in meta.items() if k != 'res'}), '"res" is None'),
      (dict(meta=dict(meta, class_names=['cat', 'dog'])), 'a list of 3 names'),
      (dict(meta=dict(meta, crop_fraction='0.875')), '"crop_fraction" is \'0.875\''),
      (dict(meta=dict(meta, crop_fraction=-0.5)), '"crop_fraction" is -0.5'),
      (dict(meta=dict(meta, num_classes=4, class_names=NAMES + ['x'])), 'says 4 classes'),
      (dict(members={'exported.bin': bytes(flipped)}), 'does not match its SHA-256'),
      # 64 MiB of JSON whitespace deflated to ~64 KiB: refused by its declared size, unread.
      (dict(meta=b' ' * 2**26 + b'{}', compress=zipfile.ZIP_DEFLATED), 'zip bomb'),
      (dict(meta=b' ' * (5 * 2**20) + b'{}'), 'above the limit of 4,194,304'),
  ]
  for i, (kw, expect) in enumerate(cases):
    bad = _rezip(archive, tmp_path / f'bad{i}.zip', **kw)
    with pytest.raises(predict.PredictError) as e:
      predict.load(bad)
    assert expect in str(e.value) and '\n' not in str(e.value), (expect, str(e.value))
  # An image above the pixel limit is refused by predict from its header, as in training.
  bomb = tmp_path / 'bomb.png'
  bomb.write_bytes(hostile_files.png_header(20000, 20000))
  with pytest.raises(predict.PredictError, match='bomb.png is too large an image: .*50,000,000'):
    predict.make_transform(meta)(str(bomb))
  assert image_limits.MAX_PIXELS == 50_000_000
  # Class names with control characters are printed escaped, never raw.
  evil = _rezip(archive, tmp_path / 'evil.zip',
                meta=dict(meta, class_names=['\x1b[2J\x1b[31mcat', 'dog\nFAKE 1.0000', 'eel']))
  image = _write_images(str(tmp_path))[0]
  r = _run('coatnet_jax.predict', '--model', evil, image, cache=str(tmp_path / 'cache'))
  assert r.returncode == 0, r.stderr[-3000:]
  assert '\x1b' not in r.stdout
  assert '\\x1b[2J\\x1b[31mcat' in r.stdout and 'dog\\nFAKE 1.0000' in r.stdout
  assert len(r.stdout.splitlines()) == 4
