"""Train-view augmentation from the config (data.crop_area, crop_aspect, hflip, vflip, rot90).

With the crop fixed to the whole image (area and aspect 1) the only randomness left is the
flips and rotations, so every train example must be one of the numpy rotations / flips of the
image, and all of them must occur (which also shows that crop_area and crop_aspect reach the
stream: a default crop would fail). The default view must stay what it was before the options.
"""

import os

import numpy as np
import pytest
import tensorflow as tf

from configs import transfer
from coatnet_jax import input_pipeline
from coatnet_jax.data import streams
from coatnet_jax.data import transforms

SIZE = 16


def _image():
  """An image with no symmetry: each of its 8 flips/rotations is distinct."""
  return np.arange(SIZE * SIZE * 3, dtype=np.uint32).reshape(SIZE, SIZE, 3).astype(np.uint8) \
      + np.tril(np.full((SIZE, SIZE), 7, np.uint8))[..., None]


def _png(image):
  return tf.io.encode_png(image).numpy()


def test_default_view_is_unchanged():
  """Inception crop (0.08-1, 3/4-4/3) and left-right flip from the first two split seeds."""
  data = _png(np.random.default_rng(0).integers(0, 256, (40, 30, 3), np.uint8))
  for s in range(4):
    seed = tf.constant([s, 9], tf.int64)
    crop_seed, flip_seed, _ = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    want = transforms.random_flip(
        transforms.random_resized_crop(data, SIZE, crop_seed), flip_seed)
    got = streams.train_transform(data, seed, image_size=SIZE)
    np.testing.assert_array_equal(got.numpy(), want.numpy())


@pytest.mark.parametrize('options, views', [
    ({'hflip': False, 'rot90': True}, lambda x: [np.rot90(x, k) for k in range(4)]),
    ({'hflip': False, 'vflip': True}, lambda x: [x, x[::-1]]),
    ({'hflip': True, 'vflip': True}, lambda x: [x, x[::-1], x[:, ::-1], x[::-1, ::-1]]),
])
def test_flips_and_rotations_from_the_config(tmp_path, options, views):
  image = _image()
  for cls in ('a', 'b'):
    os.makedirs(tmp_path / 'train' / cls)
    (tmp_path / 'train' / cls / 'x.png').write_bytes(_png(image))
  c = transfer.get_config(f'data_dir={tmp_path},res={SIZE}').data
  c.crop_area, c.crop_aspect = (1.0, 1.0), (1.0, 1.0)  # The whole image: no crop randomness.
  for k, v in options.items():
    c[k] = v
  batches = input_pipeline.train_iterator(c, 2, seed=0)
  want = [v.tobytes() for v in views(image)]
  assert len(set(want)) == len(want)
  seen = set()
  for _ in range(16):
    for got in next(batches)['image']:
      assert got.tobytes() in want
      seen.add(got.tobytes())
  assert seen == set(want)  # Every flip / rotation occurs in 32 draws.

