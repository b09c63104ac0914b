"""ImageNet-1K and -21K prepared as a new user does: the documented command, TFDS's own
``imagenet2012`` builder (its label files, its CMYK and PNG fixes), the 21K builder as a library
(``tfds.builder`` / ``tfds.load``) and from the command line, then the in1k recipe's data path
trained and evaluated on the result.

The manual directory is the real ILSVRC2012 layout in miniature: ``ILSVRC2012_img_train.tar`` of
per-synset ``nXXXXXXXX.tar`` archives (official synset ids and file names, including one of the
release's CMYK JPEGs and its PNG under a .JPEG name, by their real names) and
``ILSVRC2012_img_val.tar`` of ``ILSVRC2012_val_000000NN.JPEG`` files, whose labels the builder takes
from its own ``validation_labels.txt``.
"""

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
from PIL import Image
import pytest

from run_module import ROOT
from run_module import run_module

VAL_IMAGES = 12
CMYK_NAME = 'n01739381_1309.JPEG'  # One of the 22 CMYK JPEGs of the real train set.
PNG_NAME = 'n02105855_2933.JPEG'  # The real train set's one PNG under a .JPEG name.


def _image(seed, mode='RGB', fmt='JPEG'):
  """A real photo crop (scikit-learn's sample JPEGs), encoded as ``fmt`` in ``mode``."""
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  photo = load_sample_images().images[seed % 2]
  rng = np.random.default_rng(seed)
  h, w = rng.integers(40, 90, 2)
  y, x = rng.integers(0, photo.shape[0] - h), rng.integers(0, photo.shape[1] - w)
  buf = io.BytesIO()
  Image.fromarray(photo[y:y + h, x:x + w]).convert(mode).save(buf, fmt)
  return buf.getvalue()


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _tar(members) -> bytes:
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode='w') as t:
    for name, data in members:
      _add(t, name, data)
  return buf.getvalue()


def make_ilsvrc2012(manual_dir):
  """The two release archives; returns {train file name: synset}."""
  os.makedirs(manual_dir, exist_ok=True)
  with open(os.path.join(manual_dir, 'ILSVRC2012_img_val.tar'), 'wb') as f:
    f.write(_tar((f'ILSVRC2012_val_{i:08d}.JPEG', _image(i)) for i in range(1, VAL_IMAGES + 1)))
  train = {CMYK_NAME: 'n01739381', 'n01739381_1.JPEG': 'n01739381', PNG_NAME: 'n02105855',
           'n02105855_1.JPEG': 'n02105855', 'n01440764_10026.JPEG': 'n01440764',
           'n01440764_7.JPEG': 'n01440764'}
  synsets = sorted(set(train.values()))
  inner = {s: [] for s in synsets}
  for i, (name, synset) in enumerate(sorted(train.items())):
    data = _image(100 + i, mode='CMYK' if name == CMYK_NAME else 'RGB',
                  fmt='PNG' if name == PNG_NAME else 'JPEG')
    inner[synset].append((name, data))
  with open(os.path.join(manual_dir, 'ILSVRC2012_img_train.tar'), 'wb') as f:
    f.write(_tar((f'{s}.tar', _tar(inner[s])) for s in synsets))
  return train


def _tfds_file(name):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with open(os.path.join(os.path.dirname(tfds.__file__), 'datasets', 'imagenet2012', name)) as f:
    return f.read().split()


def _python(code, cwd):
  """A fresh interpreter (what a user's script is), with this checkout importable."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  proc = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stdout


@pytest.fixture(scope='module')
def imagenet2012(tmp_path_factory):
  """DATA_DIR prepared by the README's command, from DATA_DIR/downloads/manual."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  train = make_ilsvrc2012(os.path.join(data_dir, 'downloads', 'manual'))
  proc = run_module(['coatnet_jax.data.prepare', 'imagenet2012', '--data_dir', data_dir])
  assert 'train 6, validation 12' in proc.stdout, proc.stdout
  return data_dir, train


def test_imagenet2012_through_tfds_builder(imagenet2012):
  data_dir, train = imagenet2012
  names, val_labels = _tfds_file('labels.txt'), _tfds_file('validation_labels.txt')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  rows = [(split, e['file_name'].decode(), int(e['label']), e['image'].shape)
          for split in ('train', 'validation')
          for e in tfds.as_numpy(tfds.load('imagenet2012', split=split, data_dir=data_dir))]
  got_train = {n: names[label] for split, n, label, _ in rows if split == 'train'}
  assert got_train == train  # Synset ids -> TFDS's class indices.
  got_val = {n: names[label] for split, n, label, _ in rows if split == 'validation'}
  # The builder's own label file gives the labels: the k-th official name, the k-th line.
  assert got_val == {f'ILSVRC2012_val_{i:08d}.JPEG': val_labels[i - 1]
                     for i in range(1, VAL_IMAGES + 1)}
  assert all(shape[-1] == 3 for *_, shape in rows)  # CMYK and PNG come out as RGB.


def test_in1k_recipe_data_path_trains_and_evaluates(imagenet2012, tmp_path):
  """configs/in1k.py (Inception crop, RandAugment 2/15, Mixup, 0.875 crop) on the prepared data,
  with coatnet_pico at 32 px, started outside the repository root with a switch overridden."""
  data_dir, _ = imagenet2012
  workdir = str(tmp_path / 'run')
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  proc = subprocess.run(
      [sys.executable, '-m', 'coatnet_jax.main', '--config', 'configs/in1k.py:runlocal',
       '--workdir', workdir, '--config.model.switches.pool=avg',
       f'--config.data.data_dir={data_dir}', '--config.total_steps=2', '--config.batch_size=4',
       '--config.data.eval_split=validation', '--config.eval_batch_size=8',
       '--config.data.image_size=32',
       '--config.log_every_steps=1',
       f'--config.compilation_cache_dir={tmp_path / "xla"}'],
      cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  evals = [r for r in records if 'eval/count' in r]
  assert [r['step'] for r in evals] == [2] and evals[0]['eval/count'] == VAL_IMAGES
  assert all(np.isfinite(r['train/loss']) for r in records if 'train/loss' in r)
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  assert config['model']['switches']['pool'] == 'avg' and config['data']['crop_fraction'] == 0.875


def test_imagenet21k_as_a_library_and_from_the_command_line(tmp_path):
  """tfds.builder('imagenet21k') once the builder's module is imported (as this test module
  does); the command line on the same release; tfds.load of both in a fresh interpreter."""
  from coatnet_jax.data import imagenet21k  # pylint: disable=g-import-not-at-top
  release = tmp_path / 'release'
  release.mkdir()
  names = {}
  for s in ('n01440764', 'n01443537'):
    members = [f'{s}_{i}.JPEG' for i in range(40)]
    held = [n for n in members if imagenet21k.held_out(n)]
    kept = [n for n in members if not imagenet21k.held_out(n)][:3]
    names[s] = kept + held[:1]
    (release / f'{s}.tar').write_bytes(
        _tar((n, _image(i)) for i, n in enumerate(names[s])))
  want = sorted((n, sorted(names).index(s)) for s, ns in names.items() for n in ns)
  lib_dir, cli_dir = str(tmp_path / 'lib'), str(tmp_path / 'cli')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.builder('imagenet21k', data_dir=lib_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(release)))
  run_module(['coatnet_jax.data.prepare', 'imagenet21k', '--data_dir', cli_dir, '--manual_dir',
              str(release)])
  # A fresh interpreter that never imports the builder's module reads both by name.
  out = _python(f"""
      import json
      import tensorflow_datasets as tfds
      for data_dir in ({lib_dir!r}, {cli_dir!r}):
        rows = []
        for split in ('train', 'validation'):
          rows += [(e['file_name'].decode(), int(e['label'])) for e in tfds.as_numpy(
              tfds.load('imagenet21k', split=split, data_dir=data_dir))]
        print(json.dumps(sorted(rows)))
  """, cwd=str(tmp_path))
  for line in out.strip().splitlines()[-2:]:
    assert [tuple(r) for r in json.loads(line)] == want


def test_missing_manual_files_are_one_line(tmp_path):
  from coatnet_jax.data import DataNotFoundError  # pylint: disable=g-import-not-at-top
  from coatnet_jax.data import prepare  # pylint: disable=g-import-not-at-top
  with pytest.raises(DataNotFoundError, match='No manual directory .*downloads/manual'):
    prepare.prepare('imagenet2012', str(tmp_path))
  manual = tmp_path / 'downloads' / 'manual'
  manual.mkdir(parents=True)
  (manual / 'ILSVRC2012_img_train.tar').write_bytes(b'')
  with pytest.raises(DataNotFoundError, match='lacks ILSVRC2012_img_val.tar'):
    prepare.prepare('imagenet2012', str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ['downloads']  # Nothing written.
