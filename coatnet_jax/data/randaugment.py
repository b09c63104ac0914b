"""RandAugment(N, M) in TensorFlow, stateless: the TF EfficientNet operation list and magnitudes.

Magnitude convention (documented because the paper's "RandAugment 2/15" depends on it): the levels
of TensorFlow's EfficientNet / big_vision ``autoaugment.py``, where ``_MAX_LEVEL = 10`` and M is
NOT clipped, so M = 15 means 1.5x the "maximum" of every range below. The paper's authors trained
with that TF code; timm instead clips M to 10 (its ``m15`` equals ``m10``), which would make "2/15"
the same as "2/10". With M unclipped, at M = 15:

  Rotate 45 deg, ShearX/Y 0.45, TranslateX/Y 150 px at 224 (scaled with the image: 100/224 of the
  side per 10 levels, whole pixels), Color / Contrast / Brightness / Sharpness factor 2.8 (0.18 M + 0.1),
  Posterize keeps int(0.4 M) = 6 bits, SolarizeAdd adds int(11 M) = 165, and Solarize's threshold
  int(25.6 M) = 384 > 255 makes it the identity (as in the TF code: larger M is weaker there).

As in the TF code, each of the N layers picks one op uniformly, applies it with probability drawn
from U(0.2, 0.8), and negates the geometric magnitudes with probability 1/2. Differences from the
TF code, on purpose: Contrast blends with the true mean grey level (TF divides the histogram sum
by 256, a known bug that blends with ``num_pixels / 256``), and Cutout is not in the list (the
issue's standard list has 15 ops; TF EfficientNet lists 16 with Cutout).
"""

import math

import tensorflow as tf

from coatnet_jax.data import transforms

MAX_LEVEL = 10.0
OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd',
       'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateX',
       'TranslateY')
TRANSLATE_FRACTION = 100 / 224  # TF's translate_const=100 px at 224 px, scaled to other sizes.


# ---------------------------------------------------------------------------------------------
# The operations: uint8 HxWx3 in, uint8 HxWx3 out; the argument is the op's own unit.


def blend(degenerate, image, factor):
  """degenerate + factor * (image - degenerate), clipped to [0, 255] and truncated (as TF/PIL)."""
  degenerate = tf.cast(degenerate, tf.float32)
  out = degenerate + factor * (tf.cast(image, tf.float32) - degenerate)
  return tf.cast(tf.clip_by_value(out, 0.0, 255.0), tf.uint8)


def _grey(image):
  """ITU-R 601 luma, as PIL's convert('L'): (299 R + 587 G + 114 B) / 1000, rounded."""
  x = tf.cast(image, tf.float32)
  return tf.cast(tf.round(x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114), tf.uint8)


def apply_lut(image, lut):
  """Per-channel look-up: ``lut`` is [3, 256] (or [256] for all channels) of output values.

  Used where the table needs image statistics (AutoContrast, Equalize): the arithmetic runs on
  768 numbers, the per-pixel work is one gather. (Simple point ops stay elementwise: on one
  host core a gather costs more than a few elementwise ops.)
  """
  lut = tf.cast(tf.broadcast_to(lut, [3, 256]), tf.uint8)
  index = tf.cast(image, tf.int32) + tf.constant([0, 256, 512], tf.int32)
  return tf.gather(tf.reshape(lut, [-1]), index)


_LEVELS = tf.range(256, dtype=tf.int32)


def auto_contrast(image):
  """PIL's autocontrast (cutoff 0): each channel's [lo, hi] stretched to [0, 255]."""
  lo = tf.cast(tf.reduce_min(image, axis=[0, 1]), tf.float64)[:, None]
  hi = tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.float64)[:, None]
  levels = tf.cast(_LEVELS, tf.float64)[None]
  scale = 255.0 / tf.maximum(hi - lo, 1.0)  # float64 as PIL's Python floats: same truncation.
  lut = tf.clip_by_value(tf.floor(levels * scale - lo * scale), 0.0, 255.0)
  return apply_lut(image, tf.where(hi > lo, lut, levels))


def equalize(image):
  """Per-channel histogram equalisation with PIL's look-up-table rule."""
  index = tf.cast(image, tf.int32) + tf.constant([0, 256, 512], tf.int32)
  hist = tf.reshape(tf.math.bincount(tf.reshape(index, [-1]), minlength=768, maxlength=768),
                    [3, 256])
  # The last non-zero bin of each channel.
  last = tf.gather(hist, 255 - tf.argmax(tf.cast(tf.reverse(hist, [1]) > 0, tf.int32), 1,
                                         output_type=tf.int32), batch_dims=1)
  step = (tf.reduce_sum(hist, 1) - last) // 255
  safe = tf.maximum(step, 1)[:, None]
  lut = tf.concat([tf.zeros([3, 1], tf.int32), (tf.cumsum(hist, 1) + safe // 2)[:, :-1] // safe],
                  1)
  lut = tf.where(step[:, None] > 0, tf.clip_by_value(lut, 0, 255), _LEVELS[None])
  return apply_lut(image, lut)


def invert(image):
  return 255 - image


def posterize(image, bits):
  shift = 8 - min(max(int(bits), 0), 8)
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(x, shift), shift), tf.uint8)


def solarize(image, threshold):
  return tf.where(tf.cast(image, tf.int32) < threshold, image, 255 - image)


def solarize_add(image, addition, threshold=128):
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.where(x < threshold, tf.clip_by_value(x + addition, 0, 255), x), tf.uint8)


def color(image, factor):
  return blend(tf.repeat(_grey(image)[..., None], 3, -1), image, factor)


def contrast(image, factor):
  mean = tf.round(tf.reduce_mean(tf.cast(_grey(image), tf.float32)))
  return blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image, factor):
  return blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
  """Blend with PIL's SMOOTH filter ([[1,1,1],[1,5,1],[1,1,1]] / 13); the border is kept.

  The 3x3 sum is nine shifted slices (far cheaper on one core than a depthwise convolution).
  """
  x = tf.cast(image, tf.float32)
  h, w = tf.shape(x)[0], tf.shape(x)[1]
  box = tf.add_n([x[dy:h - 2 + dy, dx:w - 2 + dx] for dy in range(3) for dx in range(3)])
  smooth = tf.round((box + 4.0 * x[1:-1, 1:-1]) / 13.0)
  degenerate = tf.pad(smooth - x[1:-1, 1:-1], [[1, 1], [1, 1], [0, 0]]) + x
  return blend(degenerate, image, factor)


def affine(image, matrix):
  """Output pixel (x, y) takes input pixel (a x + b y + c, d x + e y + f); nearest, grey fill.

  ``matrix`` = [a, b, c, d, e, f] in PIL's ``Image.transform(AFFINE)`` convention, where the map
  acts on pixel centres (x + 0.5, y + 0.5); converted here to TF's pixel-index convention.
  """
  a, b, c, d, e, f = tf.unstack(tf.cast(matrix, tf.float32))
  c = c + 0.5 * (a + b) - 0.5
  f = f + 0.5 * (d + e) - 0.5
  transform = tf.stack([a, b, c, d, e, f, 0.0, 0.0])[None]
  shape = tf.shape(image)
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transform, output_shape=shape[:2],
      interpolation='NEAREST', fill_mode='CONSTANT', fill_value=float(transforms.FILL))
  return out[0]


def rotate(image, degrees):
  """Counter-clockwise about the centre, as PIL's ``Image.rotate``."""
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  t = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  a, b, d, e = tf.cos(t), -tf.sin(t), tf.sin(t), tf.cos(t)
  cx, cy = w / 2.0, h / 2.0
  return affine(image, tf.stack([a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy]))


def shear_x(image, level):
  return affine(image, tf.stack([1.0, level, 0.0, 0.0, 1.0, 0.0]))


def shear_y(image, level):
  return affine(image, tf.stack([1.0, 0.0, 0.0, level, 1.0, 0.0]))


def _shift(image, pixels, axis):
  """Output pixel i takes input pixel i + pixels along ``axis`` (whole pixels), grey fill."""
  n = tf.shape(image)[axis]
  p = tf.clip_by_value(tf.cast(tf.round(pixels), tf.int32), -n, n)
  fill = tf.cast(transforms.FILL, image.dtype)
  if axis == 1:
    image = tf.transpose(image, [1, 0, 2])
  kept = image[tf.maximum(p, 0):n + tf.minimum(p, 0)]
  pad = tf.fill(tf.concat([[tf.abs(p)], tf.shape(image)[1:]], 0), fill)
  out = tf.cond(p >= 0, lambda: tf.concat([kept, pad], 0), lambda: tf.concat([pad, kept], 0))
  return tf.transpose(out, [1, 0, 2]) if axis == 1 else out


def translate_x(image, pixels):
  """PIL's affine (1, 0, pixels, 0, 1, 0) for whole-pixel shifts (the level is rounded)."""
  return _shift(image, pixels, 1)


def translate_y(image, pixels):
  return _shift(image, pixels, 0)


# ---------------------------------------------------------------------------------------------
# Level -> argument, the TF EfficientNet rules (M unclipped).


def _enhance(m):
  return m / MAX_LEVEL * 1.8 + 0.1


def op_argument(name, magnitude, image_size):
  """The argument op ``name`` gets at magnitude M before the random sign (see the docstring)."""
  m = float(magnitude)
  return {
      'AutoContrast': None, 'Equalize': None, 'Invert': None,
      'Rotate': m / MAX_LEVEL * 30.0,
      'Posterize': int(m / MAX_LEVEL * 4),
      'Solarize': int(m / MAX_LEVEL * 256),
      'SolarizeAdd': int(m / MAX_LEVEL * 110),
      'Color': _enhance(m), 'Contrast': _enhance(m), 'Brightness': _enhance(m),
      'Sharpness': _enhance(m),
      'ShearX': m / MAX_LEVEL * 0.3, 'ShearY': m / MAX_LEVEL * 0.3,
      'TranslateX': m / MAX_LEVEL * TRANSLATE_FRACTION * image_size,
      'TranslateY': m / MAX_LEVEL * TRANSLATE_FRACTION * image_size,
  }[name]


SIGNED = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY')
_FUNCS = {
    'AutoContrast': lambda im, a: auto_contrast(im), 'Equalize': lambda im, a: equalize(im),
    'Invert': lambda im, a: invert(im), 'Rotate': rotate,
    'Posterize': posterize,
    'Solarize': solarize, 'SolarizeAdd': solarize_add, 'Color': color, 'Contrast': contrast,
    'Brightness': brightness, 'Sharpness': sharpness, 'ShearX': shear_x, 'ShearY': shear_y,
    'TranslateX': translate_x, 'TranslateY': translate_y,
}


def apply_op(image, name, magnitude, sign=1.0):
  """Op ``name`` at magnitude M (sign -1 negates the geometric ones): for tests and tools."""
  arg = op_argument(name, magnitude, image.shape[1])
  if name in SIGNED:
    arg = arg * sign
  return _FUNCS[name](image, arg)


def randaugment(image, num_layers, magnitude, seed, ops=OPS):
  """N layers, each one op of ``ops`` chosen uniformly and applied with probability U(0.2, 0.8)."""
  if not num_layers:
    return image
  size = image.shape[1]
  if size is None:
    raise ValueError('RandAugment needs a static image size (apply it after the resize).')
  for layer in range(num_layers):
    s_op, s_prob, s_apply, s_sign = tf.unstack(
        tf.random.experimental.stateless_split(
            tf.random.experimental.stateless_fold_in(seed, layer), 4))
    index = tf.random.stateless_uniform([], s_op, 0, len(ops), tf.int32)
    prob = tf.random.stateless_uniform([], s_prob, 0.2, 0.8)
    apply = tf.random.stateless_uniform([], s_apply) < prob
    sign = tf.where(tf.random.stateless_uniform([], s_sign) < 0.5, -1.0, 1.0)

    def branch(name):
      arg = op_argument(name, magnitude, size)
      if name in SIGNED:
        return lambda: _FUNCS[name](image, arg * sign)
      return lambda: _FUNCS[name](image, arg)

    image = tf.cond(apply, lambda: tf.switch_case(index, [branch(n) for n in ops]),
                    lambda: image)
    image.set_shape([size, size, 3])
  return image
