"""The data interface: the digits split, exact padded evaluation, resumable order, TFDS."""

import subprocess
import sys
import os

import ml_collections
import numpy as np
import pytest

from coatnet_jax import input_pipeline
from coatnet_jax import steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _digits_config(**kw):
  c = ml_collections.ConfigDict(dict(name='digits', image_size=32, train_split='train',
                                     eval_split='test', max_shift=0))
  c.update(kw)
  return c


def test_digits_split_is_fixed_disjoint_and_complete():
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  train_x, train_y = input_pipeline._digits_arrays(8, 'train')
  test_x, test_y = input_pipeline._digits_arrays(8, 'test')
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
  again_x, _ = input_pipeline._digits_arrays(8, 'test')
  np.testing.assert_array_equal(again_x, test_x)
  big, _ = input_pipeline._digits_arrays(32, 'test')
  np.testing.assert_array_equal(big[:, ::4, ::4], test_x)  # Nearest upsampling.


@pytest.mark.parametrize('n', [37, 359])  # Primes: no batch size divides them.
@pytest.mark.parametrize('global_batch,processes', [
    (b, p) for b in (1, 4, 8, 16, 64, 512) for p in (1, 2, 4) if b % p == 0])
def test_exact_eval_sees_every_example_once(n, global_batch, processes):
  images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)
  labels = np.arange(n, dtype=np.int32)
  seen, counts = [], []
  for p in range(processes):
    batches = list(input_pipeline.in_memory_eval_iterator(
        images, labels, global_batch, process_index=p, process_count=processes))
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


def test_tfds_source_on_disk_and_mock_data(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES='')
  proc = subprocess.run([sys.executable, 'tests/tfds_run.py', str(tmp_path)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert 'TFDS_OK' in proc.stdout, proc.stderr[-4000:]
