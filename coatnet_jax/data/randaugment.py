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
by 256, a known bug that blends with ``num_pixels / 256``), AutoContrast is the exact stretch
(TF's float32 and PIL's float64 put some levels 1 low), and Cutout is not in the list (the
issue's standard list has 15 ops; TF EfficientNet lists 16 with Cutout).
"""

import math

import numpy as np
import tensorflow as tf

from coatnet_jax.data import transforms

MAX_LEVEL = 10.0
OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd',
       'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateX',
       'TranslateY')
TRANSLATE_FRACTION = 100 / 224  # TF's translate_const=100 px at 224 px, scaled to other sizes.


# ---------------------------------------------------------------------------------------------
# The operations: uint8 HxWx3 in, uint8 HxWx3 out; the argument is the op's own unit.
#
# Written for one host core (profiled one by one in tf.data, where an op over a 224x224x3 image
# costs about 0.05 ms per pass): as few full-size passes as the op allows, uint8 arithmetic where
# it is exact, no tf.where on images (a select costs ~30 passes), no per-channel broadcasting over
# the last axis (~5x a plain op), and geometric ops as one gather of whole pixels.


def _f32(image):
  return tf.cast(image, tf.float32)


def _u8(x):
  """Clipped to [0, 255] and truncated, as TF/PIL store a blend."""
  return tf.cast(tf.clip_by_value(x, 0.0, 255.0), tf.uint8)


def blend(degenerate, image, factor):
  """degenerate + factor * (image - degenerate), clipped to [0, 255] and truncated (as TF/PIL).

  ``degenerate`` is a float32 image of the same shape or a scalar; ``image`` is uint8.
  """
  return _u8(degenerate + factor * (_f32(image) - degenerate))


def _grey(image):
  """ITU-R 601 luma, as PIL's convert('L'): (299 R + 587 G + 114 B) / 1000, rounded; float32."""
  return tf.round(_f32(image[..., 0]) * 0.299 + _f32(image[..., 1]) * 0.587
                  + _f32(image[..., 2]) * 0.114)


def _channel_min_max(image):
  flat = tf.reshape(image, [-1, 3])
  return tf.reduce_min(flat, 0), tf.reduce_max(flat, 0)


def _per_channel(image, scale, offset):
  """image * scale + offset with [3] scale and offset, in float32.

  Laid out as [H, W * 3] rows so that the [3] vectors broadcast along the outer axis.
  """
  h, w = image.shape[0], image.shape[1]
  rows = tf.reshape(_f32(image), [h, w * 3])
  return tf.reshape(rows * tf.tile(scale, [w]) + tf.tile(offset, [w]), [h, w, 3])


def auto_contrast(image):
  """Each channel's [lo, hi] stretched to [0, 255]: floor(255 (x - lo) / (hi - lo)), exactly.

  PIL's autocontrast (cutoff 0) computes this in float64 and lands 1 lower on a few levels
  whose value is a whole number (TF EfficientNet's float32 on many more). In float32 here, plus
  1e-3: a non-whole value is at least 1/255 below the next whole number, far above the error.
  """
  lo, hi = (tf.cast(v, tf.float32) for v in _channel_min_max(image))
  stretch = hi > lo
  scale = tf.where(stretch, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
  offset = tf.where(stretch, 1e-3 - lo * scale, 0.0)
  # Values land in [1e-3, 255 + 1e-3]: the truncating cast needs no clip.
  return tf.cast(_per_channel(image, scale, offset), tf.uint8)


def _offsets(shape):
  """Constant [H, W, 3] of 0, 256, 512 by channel: indexes a [3 * 256] table without broadcast."""
  return tf.constant(np.broadcast_to(np.arange(0, 768, 256, dtype=np.int64), shape))


def equalize(image):
  """Per-channel histogram equalisation with PIL's look-up-table rule."""
  hist = tf.stack([tf.histogram_fixed_width(tf.cast(image[..., c], tf.int32), [0, 256], 256)
                   for c in range(3)])
  # The last non-zero bin of each channel.
  last = tf.gather(hist, 255 - tf.argmax(tf.cast(tf.reverse(hist, [1]) > 0, tf.int32), 1,
                                         output_type=tf.int32), batch_dims=1)
  step = (tf.reduce_sum(hist, 1) - last) // 255
  safe = tf.maximum(step, 1)[:, None]
  lut = tf.concat([tf.zeros([3, 1], tf.int32), (tf.cumsum(hist, 1) + safe // 2)[:, :-1] // safe],
                  1)
  lut = tf.where(step[:, None] > 0, tf.clip_by_value(lut, 0, 255), tf.range(256)[None])
  # One gather of every value: the per-pixel cost of equalisation (no cheaper TF look-up exists;
  # GatherNd with int64 indices is the cheapest form of it, about 30% below GatherV2).
  index = tf.cast(image, tf.int64) + _offsets(image.shape)
  return tf.gather_nd(tf.cast(tf.reshape(lut, [-1]), tf.uint8), index[..., None])


def invert(image):
  return 255 - image


def posterize(image, bits):
  """Keeps the ``bits`` high bits: one AND with a constant mask."""
  shift = 8 - min(max(int(bits), 0), 8)
  return tf.bitwise.bitwise_and(image, tf.constant((0xFF << shift) & 0xFF, tf.uint8))


def solarize(image, threshold):
  """Inverts the values >= ``threshold``: XOR with 255 where the mask is set (no select)."""
  threshold = int(threshold)
  if threshold > 255:
    return image
  if threshold <= 0:
    return invert(image)
  mask = tf.cast(image >= tf.constant(threshold, tf.uint8), tf.uint8)
  return tf.bitwise.bitwise_xor(image, mask * 255)


def solarize_add(image, addition, threshold=128):
  """Adds ``addition`` (saturating at 255) to the values below ``threshold``; in uint8."""
  addition, threshold = min(max(int(addition), 0), 255), int(threshold)
  if threshold <= 0 or not addition:
    return image
  room = tf.minimum(tf.constant(addition, tf.uint8), 255 - image)
  if threshold > 255:
    return image + room
  return image + tf.cast(image < tf.constant(threshold, tf.uint8), tf.uint8) * room


def color(image, factor):
  return blend(tf.tile(_grey(image)[..., None], [1, 1, 3]), image, factor)


def contrast(image, factor):
  return blend(tf.round(tf.reduce_mean(_grey(image))), image, factor)


def brightness(image, factor):
  return _u8(factor * _f32(image))


def sharpness(image, factor):
  """Blend with PIL's SMOOTH filter ([[1,1,1],[1,5,1],[1,1,1]] / 13); the border is kept.

  The 3x3 sum is separable and runs on the flat image, where a neighbour is a whole-array
  offset (3 for x, 3 W for y): contiguous slices only. Values that wrap across a row end land
  in the border columns, which are replaced by the image's own.
  """
  h, w = image.shape[0], image.shape[1]
  row = 3 * w
  x = tf.reshape(_f32(image), [-1])
  rows = x[:-6] + x[3:-3] + x[6:]  # Centred on x[3:-3].
  box = rows[:-2 * row] + rows[row:-row] + rows[2 * row:]  # Centred on x[row + 3:-row - 3].
  centre = x[row + 3:-row - 3]
  smooth = tf.round((box + 4.0 * centre) / 13.0)
  inner = _u8(smooth + factor * (centre - smooth))
  # Positions row + 3 .. end - row - 3 are rows 1 .. h - 2 from column 1; pad to whole rows.
  inner = tf.reshape(tf.concat([inner, tf.zeros([6], tf.uint8)], 0), [h - 2, w, 3])[:, :-2]
  return tf.concat([image[:1], tf.concat([image[1:-1, :1], inner, image[1:-1, -1:]], 1),
                    image[-1:]], 0)


def _source(coef_x, coef_y, const, xs, ys, limit):
  """floor(coef_x * xs + coef_y * ys + const) + 1, clipped to [0, limit + 1], as int32.

  A coefficient that is the Python number 0 drops its term, so the result keeps only the axes it
  depends on ([1, W], [H, 1] or [H, W]) and the caller's broadcast does the rest. Clipping
  before the truncating cast equals flooring first: anything below 0 lands on the frame either way.
  """
  terms = [c * v for c, v in ((coef_x, xs), (coef_y, ys)) if not _is_zero(c)]
  value = const + 1.0
  for term in terms:
    value = term + value
  return tf.cast(tf.clip_by_value(value, 0.0, limit + 1.0), tf.int32)


def _is_zero(value):
  return isinstance(value, (int, float)) and value == 0


def affine(image, matrix):
  """Output pixel (x, y) takes input pixel (a x + b y + c, d x + e y + f); nearest, grey fill.

  ``matrix`` = [a, b, c, d, e, f] (Python numbers or scalar tensors) in PIL's
  ``Image.transform(AFFINE)`` convention: the map acts on pixel centres (x + 0.5, y + 0.5) and
  the source pixel is the floor of the result, as PIL's NEAREST. The source coordinates are
  sums of a row and a column vector (a shear touches one full-size array, not six), and the
  pixels come in one GatherNd (the cheapest TF gather per index) from the image framed by one
  fill pixel, where every source outside the image lands (cheaper than
  ImageProjectiveTransform, which maps each channel).
  """
  h, w = image.shape[0], image.shape[1]
  a, b, c, d, e, f = (v if isinstance(v, (int, float)) else tf.cast(v, tf.float32) for v in matrix)
  xs = tf.constant(np.arange(0.5, w, dtype=np.float32)[None, :])
  ys = tf.constant(np.arange(0.5, h, dtype=np.float32)[:, None])
  sx = _source(a, b, c, xs, ys, w)
  sy = _source(d, e, f, xs, ys, h)
  framed = tf.pad(image, [[1, 1], [1, 1], [0, 0]], constant_values=transforms.FILL)
  index = sy * (w + 2) + sx  # [H, W] whenever x' depends on x and y' on y.
  return tf.gather_nd(tf.reshape(framed, [-1, 3]), index[..., None])


def rotate(image, degrees):
  """Counter-clockwise about the centre, as PIL's ``Image.rotate``."""
  h = float(image.shape[0])
  w = float(image.shape[1])
  t = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  a, b, d, e = tf.cos(t), -tf.sin(t), tf.sin(t), tf.cos(t)
  cx, cy = w / 2.0, h / 2.0
  return affine(image, [a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy])


def shear_x(image, level):
  return affine(image, [1.0, level, 0.0, 0.0, 1.0, 0.0])


def shear_y(image, level):
  return affine(image, [1.0, 0.0, 0.0, level, 1.0, 0.0])


def _shift(image, pixels, axis):
  """Output pixel i takes input pixel i + pixels along ``axis`` (whole pixels), grey fill."""
  shape = image.shape.as_list()
  n = shape[axis]
  p = tf.clip_by_value(tf.cast(tf.round(pixels), tf.int32), -n, n)
  begin, size = [0, 0, 0], list(shape)
  begin[axis], size[axis] = tf.maximum(p, 0), n - tf.abs(p)
  kept = tf.slice(image, tf.stack(begin), tf.stack(size))
  size[axis] = tf.abs(p)
  pad = tf.fill(tf.stack(size), tf.constant(transforms.FILL, image.dtype))
  out = tf.cond(p >= 0, lambda: tf.concat([kept, pad], axis), lambda: tf.concat([pad, kept], axis))
  out.set_shape(shape)
  return out


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
  """N layers, each one op of ``ops`` chosen uniformly and applied with probability U(0.2, 0.8).

  All draws come from one stateless call: per layer uniforms for (op, probability, apply, sign).
  A layer is one functional Case op whose last branch is "not applied", so it runs only the op it
  draws. ``tf.raw_ops.Case`` rather than ``tf.switch_case``: inside tf.data, switch_case is lowered
  to Switch/Merge and every op of the 15 branches not taken still passes through the executor as a
  dead node, about 0.1 ms per image (15% of RandAugment), for the same pixels.
  """
  if not num_layers:
    return image
  shape = image.shape
  if not shape.is_fully_defined():
    raise ValueError('RandAugment needs a static image shape (apply it after the resize).')
  u_op, u_prob, u_apply, u_sign = tf.unstack(tf.random.stateless_uniform([4, num_layers], seed))
  chosen = tf.minimum(tf.cast(u_op * len(ops), tf.int32), len(ops) - 1)
  index = tf.unstack(tf.where(u_apply < 0.2 + 0.6 * u_prob, chosen, len(ops)))
  signs = tf.unstack(tf.where(u_sign < 0.5, -1.0, 1.0))
  branches = _branches(ops, magnitude, shape)
  for layer in range(num_layers):
    image, = tf.raw_ops.Case(branch_index=index[layer], input=[image, signs[layer]],
                             Tout=[tf.uint8], branches=branches, output_shapes=[shape])
  return image


def _branches(ops, magnitude, shape):
  """A concrete function (image, sign) -> image per op at magnitude M, then "not applied"."""
  def op(name):
    arg = op_argument(name, magnitude, shape[1])
    if name in SIGNED:
      return lambda image, sign: _FUNCS[name](image, arg * sign)
    return lambda image, sign: _FUNCS[name](image, arg)

  specs = (tf.TensorSpec(shape, tf.uint8), tf.TensorSpec([], tf.float32))
  branches = []
  for fn in [op(name) for name in ops] + [lambda image, sign: tf.identity(image)]:
    concrete = tf.function(fn, autograph=False).get_concrete_function(*specs)
    if concrete.captured_inputs:  # A Case passes every branch the same inputs and nothing else.
      raise ValueError('A RandAugment op captures a tensor from outside; create it inside the op.')
    branches.append(concrete)
  return branches
