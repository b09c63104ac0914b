"""RandAugment: every op against an independent reference (PIL or a closed form), eagerly and
inside tf.data; the magnitude convention; determinism of the stateless draw."""

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
import pytest
import tensorflow as tf

from coatnet_jax.data import randaugment as ra

tf.config.set_visible_devices([], 'GPU')


def _image(seed=0, size=32):
  """A smooth-ish natural-looking image: gradients plus noise, not constant anywhere."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:size, 0:size]
  base = np.stack([x * 4, y * 5, (x + y) * 3], -1) + rng.integers(0, 60, (size, size, 3))
  return np.clip(base + 20, 0, 230).astype(np.uint8)


def _in_tf_data(fn, image):
  ds = tf.data.Dataset.from_tensors(image).map(fn, num_parallel_calls=2, deterministic=True)
  return next(iter(ds)).numpy()


def _pil(img):
  return Image.fromarray(img)


FILL = (128, 128, 128)
# name: (magnitude, PIL reference of the op at that magnitude's argument, max |diff|, min share
# of pixels within it). Geometric ops allow a few pixels to round differently at edges.
M = 7
CASES = {
    # PIL's float64 lands 1 below the exact stretch on a few levels (exact form tested below).
    'AutoContrast': (lambda im, a: ImageOps.autocontrast(im), 1, 1.0),
    'Equalize': (lambda im, a: ImageOps.equalize(im), 0, 1.0),
    'Invert': (lambda im, a: ImageOps.invert(im), 0, 1.0),
    'Posterize': (lambda im, a: ImageOps.posterize(im, a), 0, 1.0),
    'Solarize': (lambda im, a: ImageOps.solarize(im, a), 0, 1.0),
    'Color': (lambda im, a: ImageEnhance.Color(im).enhance(a), 2, 1.0),
    'Contrast': (lambda im, a: ImageEnhance.Contrast(im).enhance(a), 2, 1.0),
    'Brightness': (lambda im, a: ImageEnhance.Brightness(im).enhance(a), 1, 1.0),
    'Rotate': (lambda im, a: im.rotate(a, fillcolor=FILL), 0, 0.99),
    'ShearX': (lambda im, a: im.transform(im.size, Image.AFFINE, (1, a, 0, 0, 1, 0),
                                          fillcolor=FILL), 0, 0.99),
    'ShearY': (lambda im, a: im.transform(im.size, Image.AFFINE, (1, 0, 0, a, 1, 0),
                                          fillcolor=FILL), 0, 0.99),
    'TranslateX': (lambda im, a: im.transform(im.size, Image.AFFINE, (1, 0, a, 0, 1, 0),
                                              fillcolor=FILL), 0, 1.0),
    'TranslateY': (lambda im, a: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, a),
                                              fillcolor=FILL), 0, 1.0),
}


@pytest.mark.parametrize('name, sign', [(n, s) for n in sorted(CASES)
                                         for s in ((1.0, -1.0) if n in ra.SIGNED else (1.0,))])
def test_op_matches_pil_eagerly_and_in_tf_data(name, sign):
  reference, tol, share = CASES[name]
  img = _image()
  arg = ra.op_argument(name, M, img.shape[1])
  if name in ra.SIGNED:
    arg *= sign
  if name.startswith('Translate'):
    arg = round(arg)  # PIL's nearest sampling of a whole-pixel shift is exact.
    want = np.asarray(reference(_pil(img), arg))
    got = ra._FUNCS[name](tf.constant(img), float(arg)).numpy()
  else:
    want = np.asarray(reference(_pil(img), arg))
    got = ra.apply_op(tf.constant(img), name, M, sign).numpy()
  diff = np.abs(got.astype(int) - want.astype(int)).max(-1)
  assert got.dtype == np.uint8 and got.shape == img.shape
  assert np.mean(diff <= tol) >= share, (name, np.mean(diff <= tol), diff.max())
  if name not in ('Invert',):
    assert not np.array_equal(got, img), f'{name} did nothing at M={M}'
  in_data = _in_tf_data(lambda x: ra.apply_op(x, name, M, sign) if not name.startswith(
      'Translate') else ra._FUNCS[name](x, float(arg)), img)
  np.testing.assert_array_equal(in_data, got)


@pytest.mark.parametrize('seed', range(4))
def test_auto_contrast_is_the_exact_stretch(seed):
  img = _image(seed)
  img[0, 0, 1], img[1, 1, 2] = 7, 7  # Different ranges per channel; channel 2 also flat below.
  img[..., 2] = np.where(img[..., 2] > 7, 200, 7)
  lo, hi = img.reshape(-1, 3).min(0).astype(int), img.reshape(-1, 3).max(0).astype(int)
  want = ((img - lo) * 255 // (hi - lo)).astype(np.uint8)
  np.testing.assert_array_equal(ra.auto_contrast(tf.constant(img)).numpy(), want)
  flat = np.full_like(img, 9)
  np.testing.assert_array_equal(ra.auto_contrast(tf.constant(flat)).numpy(), flat)


def test_sharpness_matches_pil_inside():
  img = _image(1)
  want = np.asarray(ImageEnhance.Sharpness(_pil(img)).enhance(1.9))
  got = ra.sharpness(tf.constant(img), 1.9).numpy()
  inner = np.abs(got.astype(int) - want.astype(int))[1:-1, 1:-1]
  assert inner.max() <= 2, inner.max()
  border = np.ones(img.shape[:2], bool)
  border[1:-1, 1:-1] = False
  np.testing.assert_array_equal(got[border], want[border])  # PIL keeps the border pixels.
  np.testing.assert_array_equal(_in_tf_data(lambda x: ra.sharpness(x, 1.9), img), got)


def test_solarize_add_closed_form():
  img = _image(2)
  got = ra.apply_op(tf.constant(img), 'SolarizeAdd', M).numpy()
  add = int(M / 10 * 110)
  want = np.where(img < 128, np.minimum(img.astype(int) + add, 255), img).astype(np.uint8)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(_in_tf_data(lambda x: ra.apply_op(x, 'SolarizeAdd', M), img), got)


def test_randaugment_draws_ops_probabilities_and_signs():
  """Per layer: an op uniformly, applied with probability E[U(0.2, 0.8)] = 1/2, sign +-1 evenly."""
  img = _image(5)
  seeds = tf.data.Dataset.range(600).map(lambda i: tf.stack([i, tf.constant(9, tf.int64)]))

  def outcomes(ops, magnitude=3):
    ds = seeds.map(lambda s: ra.randaugment(tf.constant(img), 1, magnitude, s, ops=ops))
    return [o for o in ds.as_numpy_iterator()]

  def share(outs, want):
    return np.mean([np.array_equal(o, want) for o in outs])

  outs = outcomes(('Invert', 'Posterize'))
  inverted, posterized = 255 - img, ra.apply_op(tf.constant(img), 'Posterize', 3).numpy()
  assert 0.2 < share(outs, inverted) < 0.3 and 0.2 < share(outs, posterized) < 0.3
  assert 0.44 < share(outs, img) < 0.56
  outs = outcomes(('TranslateY',))
  up, down = (ra.apply_op(tf.constant(img), 'TranslateY', 3, s).numpy() for s in (1, -1))
  assert 0.2 < share(outs, up) < 0.3 and 0.2 < share(outs, down) < 0.3


def test_magnitude_convention_is_tf_unclipped():
  at = lambda name: ra.op_argument(name, 15, 224)
  assert at('Rotate') == pytest.approx(45.0)
  assert at('ShearX') == pytest.approx(0.45)
  assert at('TranslateX') == pytest.approx(150.0)
  assert at('Color') == pytest.approx(2.8)
  assert at('Posterize') == 6
  assert at('Solarize') == 384  # Identity above M = 10 (TF's rule).
  assert at('SolarizeAdd') == 165
  assert ra.op_argument('TranslateX', 10, 448) == pytest.approx(200.0)  # Scales with the image.
  img = _image(3)
  np.testing.assert_array_equal(ra.apply_op(tf.constant(img), 'Solarize', 15).numpy(), img)


def test_randaugment_is_a_function_of_the_seed():
  img = tf.constant(_image(4))
  outs = [ra.randaugment(img, 2, 15, tf.constant([s, 0], tf.int64)).numpy() for s in range(12)]
  again = ra.randaugment(img, 2, 15, tf.constant([5, 0], tf.int64)).numpy()
  np.testing.assert_array_equal(again, outs[5])
  assert len({o.tobytes() for o in outs}) >= 6  # Different seeds, different views.
  in_data = _in_tf_data(lambda x: ra.randaugment(x, 2, 15, tf.constant([5, 0], tf.int64)),
                        _image(4))
  np.testing.assert_array_equal(in_data, outs[5])
  assert ra.randaugment(img, 0, 15, tf.constant([1, 0], tf.int64)) is img
