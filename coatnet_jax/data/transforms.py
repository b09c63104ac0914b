"""Decode, crop, resize and flip in tf.data; every random op is stateless and takes its own seed.

Randomness comes only from the ``seed`` argument (a [2] int tensor derived from (run seed, process,
stream position) by ``streams``), never from op-level state, so the output for an example depends
on nothing but its position in the stream: not on thread scheduling, not on what ran before.

Images stay uint8 RGB; ``steps.normalize`` (on the device) is the one place that maps
pixels to model inputs, and ``MEAN_PIXEL`` below is derived from the same constants.
"""

import tensorflow as tf

# The fill colour of geometric augmentations (TF EfficientNet's 128 grey).
FILL = 128


def decode(image_bytes):
  """Any JPEG / PNG / GIF / BMP (whatever the file name says), CMYK and grey included -> RGB uint8."""
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def image_shape(image_bytes):
  """(height, width, channels) without decoding a JPEG; other formats are decoded to find out."""
  return tf.cond(tf.io.is_jpeg(image_bytes),
                 lambda: tf.image.extract_jpeg_shape(image_bytes),
                 lambda: tf.shape(decode(image_bytes)))


def decode_and_crop(image_bytes, window):
  """Decodes only ``window`` = [y, x, h, w] of a JPEG (fast path); other formats decode then crop."""
  def jpeg():
    return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)

  def other():
    return tf.image.crop_to_bounding_box(decode(image_bytes), window[0], window[1], window[2],
                                         window[3])

  image = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
  image.set_shape([None, None, 3])
  return image


def resize(image, size, method='bicubic', antialias=True):
  """Resize to ``size`` x ``size`` and round back to uint8.

  Bilinear and area outputs are means of uint8 values with non-negative weights (antialiased
  too), so only the other kernels (bicubic, Lanczos: they overshoot) need the clip.
  """
  image = tf.round(tf.image.resize(image, (size, size), method=method, antialias=antialias))
  if method not in ('bilinear', 'area'):
    image = tf.clip_by_value(image, 0, 255)
  return tf.cast(image, tf.uint8)


def inception_crop_window(shape, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """Random crop window [y, x, h, w]: area ``scale`` of the image, aspect ``ratio`` (Inception)."""
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.zeros([1, 0, 4]), seed=seed, min_object_covered=0.1,
      aspect_ratio_range=ratio, area_range=scale, max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  return tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])


def random_resized_crop(image_bytes, size, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        method='bilinear', antialias=False):
  """Inception-style random resized crop straight from the encoded bytes.

  Bilinear without antialiasing by default, as big_vision's inception_crop (TF EfficientNet used
  bicubic, also without antialiasing): the crop's scale is random anyway, and antialiasing
  doubles the cost of the resize on the host.
  """
  window = inception_crop_window(image_shape(image_bytes), seed, scale, ratio)
  return resize(decode_and_crop(image_bytes, window), size, method, antialias)


def random_flip(image, seed):
  return tf.image.stateless_random_flip_left_right(image, seed)


def random_rot90(image, seed):
  """A rotation by k x 90 degrees, k uniform in 0..3 (square images: tiles have no up)."""
  k = tf.random.stateless_uniform([], seed, 0, 4, dtype=tf.int32)
  return tf.image.rot90(image, k)


def center_crop_window(shape, crop_fraction):
  """The central square of side ``crop_fraction`` x the shorter side, as [y, x, h, w]."""
  h, w = shape[0], shape[1]
  side = tf.cast(crop_fraction * tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
  side = tf.maximum(side, 1)
  return tf.stack([(h - side + 1) // 2, (w - side + 1) // 2, side, side])


def eval_image(image_bytes, size, crop_fraction=0.875, method='bicubic'):
  """Evaluation view at any resolution.

  ``crop_fraction`` in (0, 1): the pre-training protocol, the central crop of that fraction of the
  shorter side, resized to ``size``. ``None`` or >= 1: the fine-tuning protocol of the paper, the
  whole image resized to ``size`` x ``size`` without a crop.
  """
  if crop_fraction is None or crop_fraction >= 1:
    return resize(decode(image_bytes), size, method)
  window = center_crop_window(image_shape(image_bytes), crop_fraction)
  return resize(decode_and_crop(image_bytes, window), size, method)
