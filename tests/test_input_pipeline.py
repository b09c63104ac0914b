"""The data interface: the digits split, exact padded evaluation, resumable order, TFDS."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import common
from coatnet_jax import input_pipeline
from coatnet_jax.data import digits
from coatnet_jax.data import source
from coatnet_jax import steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _digits_config(**kw):
  c = common.get_base_config().data
  c.update(dict(name='digits', image_size=32, train_split='train', eval_split='test',
                max_shift=0))
  c.update(kw)
  return c


def test_digits_split_is_fixed_disjoint_and_complete():
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  train_x, train_y = digits.arrays(8, 'train')
  test_x, test_y = digits.arrays(8, 'test')
  assert len(train_y) + len(test_y) == 1797
  assert 0.19 < len(test_y) / 1797 < 0.21
  assert train_x.dtype == np.uint8 and train_x.shape[1:] == (8, 8, 3)
  # Every original image lands in exactly one split: compare multisets of (pixels, label).
  d = datasets.load_digits()
  orig = sorted((np.round(im * 255 / 16).astype(np.uint8).tobytes(), int(l))
                for im, l in zip(d.images, d.target))
  ours = sorted((im[..., 0].tobytes(), int(l)) for im, l in
                zip(np.concatenate([train_x, test_x]), np.concatenate([train_y, test_y])))
  assert ours == orig
  again_x, _ = digits.arrays(8, 'test')
  np.testing.assert_array_equal(again_x, test_x)
  big, _ = digits.arrays(32, 'test')
  np.testing.assert_array_equal(big[:, ::4, ::4], test_x)  # Nearest upsampling.


@pytest.mark.parametrize('n', [37, 359])  # Primes: no batch size divides them.
@pytest.mark.parametrize('global_batch,processes', [
    (b, p) for b in (1, 4, 8, 16, 64, 512) for p in (1, 2, 4) if b % p == 0])
def test_exact_eval_sees_every_example_once(n, global_batch, processes):
  images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)
  labels = np.arange(n, dtype=np.int32)
  seen, counts = [], []
  for p in range(processes):
    batches = list(digits.padded_batches(images, labels, global_batch, p, processes))
    counts.append(len(batches))
    for b in batches:
      assert len(b['label']) == global_batch // processes
      seen.extend(b['label'][b['mask'] == 1].tolist())
  assert len(set(counts)) == 1  # Every process runs the same number of batches.
  assert counts[0] == -(-n // global_batch)
  assert sorted(seen) == list(range(n))


def test_train_batches_are_split_across_processes_and_resume_exactly():
  c = _digits_config(max_shift=2)
  full = input_pipeline.train_iterator(c, 64, seed=3)
  first = [next(full) for _ in range(30)]  # 30 > 22 steps per epoch: crosses an epoch.
  halves = [input_pipeline.train_iterator(c, 64, seed=3, process_index=p, process_count=2)
            for p in range(2)]
  for b in first[:3]:
    parts = [next(h) for h in halves]
    np.testing.assert_array_equal(np.concatenate([p['label'] for p in parts]), b['label'])
    np.testing.assert_array_equal(np.concatenate([p['image'] for p in parts]), b['image'])
  resumed = input_pipeline.train_iterator(c, 64, seed=3, start_step=25)
  for want in first[25:30]:
    got = next(resumed)
    np.testing.assert_array_equal(got['image'], want['image'])
  epoch = np.concatenate([b['label'] for b in first[:22]])
  assert len(epoch) == 22 * 64  # No example twice within an epoch: checked via images below.
  imgs = np.concatenate([b['image'] for b in first[:22]])
  assert len({im.tobytes() for im in imgs}) >= 0.97 * len(imgs)  # (digits has a few duplicates)


def test_normalize_is_the_one_place():
  x = np.full((1, 2, 2, 3), 255, np.uint8)
  out = np.asarray(steps.normalize(x))
  want = (255 - np.array(steps.MEAN_RGB)) / np.array(steps.STDDEV_RGB)
  np.testing.assert_allclose(out[0, 0, 0], want, rtol=1e-6)


def test_every_source_keeps_the_contract_and_answers_its_spec_without_data():
  """Every source of the table, and the TFDS fallback, is a DataSource; the label spec and the
  eval protocol (ahead-of-time compile, export) come from the config alone: no file read, no
  TensorFlow imported, however absent the data."""
  code = """if True:
    import json, sys
    import numpy as np
    from configs import common
    from coatnet_jax import input_pipeline
    from coatnet_jax.data import source
    out = {}
    for name in list(input_pipeline.SOURCES) + ['imagenet2012']:
      c = common.get_base_config().data
      c.update(dict(name=name, data_dir='/nonexistent', num_classes=7))
      s = input_pipeline.data_source(c)
      assert isinstance(s, source.DataSource), name
      shape, dtype = s.label_spec(7)
      out[name] = [list(shape), np.dtype(dtype).name, s.eval_protocol()]
    out['tf_imported'] = 'tensorflow' in sys.modules
    print(json.dumps(out))
  """
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.splitlines()[-1])
  assert out.pop('tf_imported') is False
  crop = {'crop_fraction': 0.875, 'resize_method': 'bicubic'}
  assert out == {'digits': [[], 'int32', {'crop_fraction': None, 'resize_method': 'nearest'}],
                 'tfrecords': [[7], 'float32', crop], 'folders': [[], 'int32', crop],
                 'imagenet2012': [[], 'int32', crop]}
  assert not isinstance(object(), source.DataSource)


def test_tfds_source_on_disk_and_mock_data(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES='')
  proc = subprocess.run([sys.executable, 'tests/tfds_run.py', str(tmp_path)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert 'TFDS_OK' in proc.stdout, proc.stderr[-4000:]
