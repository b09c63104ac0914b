"""The data interface: per-process numpy batches, an in-memory digits source and a TFDS source.

Every source yields this process's share of each global batch as a dict of numpy arrays:
``image`` (uint8, NHWC, RGB), ``label`` (int32), and for evaluation ``mask`` (1 for a real example,
0 for padding). Images stay uint8 until they reach the device, where ``normalize`` is the ONE place
that turns pixels into model inputs; the transfer is 4x smaller that way.

Evaluation is exact: every process runs the same number of batches, padded with masked examples, so
the metrics count each example of the split once on any number of processes and devices.

TensorFlow is imported only inside the TFDS functions, and only when a TFDS dataset is used: the
quickstart, the step and the model never import it.
"""

import dataclasses
import math
from typing import Iterator

from absl import logging
import jax.numpy as jnp
import numpy as np

Batch = dict[str, np.ndarray]

# ImageNet statistics in 0..255 pixel units; the digits use them too, so one code path serves all.
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def normalize(images, dtype=jnp.float32):
  """uint8 pixels -> normalised model inputs; runs on the device inside the jitted steps."""
  mean = jnp.asarray(MEAN_RGB, jnp.float32)
  std = jnp.asarray(STDDEV_RGB, jnp.float32)
  return ((jnp.asarray(images, jnp.float32) - mean) / std).astype(dtype)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  train_size: int
  eval_size: int


def local_batch_size(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(f'Global batch {global_batch} is not divisible by {process_count} processes.')
  return global_batch // process_count


def num_eval_batches(split_size: int, global_batch: int) -> int:
  """Batches each process runs to see all ``split_size`` examples (the last ones padded)."""
  return max(1, math.ceil(split_size / global_batch))


def _log_unapplied(config):
  """Names augmentations that the config asks for but this pipeline does not apply yet."""
  if config.get('randaugment') and config.randaugment.get('num_layers', 0):
    logging.warning('config.data.randaugment=%s is NOT applied yet (a later issue); training '
                    'runs without it.', dict(config.randaugment))


# ---------------------------------------------------------------------------------------------
# Digits: the 1,797 8x8 images that scikit-learn ships, for the quickstart and the tests.


def _digits_arrays(image_size: int, split: str):
  """The fixed 80/20 split of sklearn's digits, as uint8 RGB at ``image_size`` and int32 labels."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images, labels = digits.images, digits.target.astype(np.int32)  # (1797, 8, 8), values 0..16.
  # A fixed stratified split: the same 1,437 / 360 examples on every machine and every run.
  order = np.random.RandomState(0).permutation(len(labels))
  test = np.zeros(len(labels), bool)
  for c in range(10):
    members = order[labels[order] == c]
    test[members[:int(round(0.2 * len(members)))]] = True
  keep = test if split == 'test' else ~test
  images, labels = images[keep], labels[keep]
  if image_size % 8:
    raise ValueError(f'Digits upsample 8x8 by an integer factor; image_size={image_size}.')
  k = image_size // 8
  images = np.kron(images, np.ones((1, k, k)))  # Nearest-neighbour upsampling.
  images = np.round(images * (255.0 / 16.0)).astype(np.uint8)
  return np.repeat(images[..., None], 3, axis=-1), labels


def _digits_train(config, global_batch, seed, process_index, process_count, start_step):
  images, labels = _digits_arrays(config.image_size, 'train')
  local = local_batch_size(global_batch, process_count)
  steps_per_epoch = len(labels) // global_batch
  if steps_per_epoch == 0:
    raise ValueError(f'Batch {global_batch} exceeds the {len(labels)} training digits.')
  step = start_step  # Deterministic in the step, so a resumed run sees the same batches.
  while True:
    epoch, i = divmod(step, steps_per_epoch)
    perm = np.random.default_rng((seed, epoch)).permutation(len(labels))
    # Indices and shifts are drawn for the global batch, then sliced: the same global batch on any
    # number of processes.
    mine = slice(process_index * local, (process_index + 1) * local)
    idx = perm[i * global_batch:(i + 1) * global_batch][mine]
    batch_images = images[idx]
    if config.get('max_shift', 0):
      shifts = np.random.default_rng((seed, step, 1)).integers(
          0, 2 * config.max_shift + 1, size=(global_batch, 2))[mine]
      batch_images = _shift(batch_images, config.max_shift, shifts)
    yield {'image': batch_images, 'label': labels[idx]}
    step += 1


def _shift(images, max_shift, shifts):
  """Moves image j by ``shifts[j] - max_shift`` pixels (zero fill): a cheap digits augmentation."""
  _, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
  return np.stack([p[dy:dy + h, dx:dx + w] for p, (dy, dx) in zip(padded, shifts)])


def _pad_and_split(images, labels, global_batch, process_index, process_count):
  """Exact evaluation of an in-memory split: pad to whole global batches, mask the padding."""
  n = len(labels)
  local = local_batch_size(global_batch, process_count)
  total = num_eval_batches(n, global_batch) * global_batch
  mask = np.arange(total) < n
  images = np.concatenate([images, np.zeros((total - n,) + images.shape[1:], images.dtype)])
  labels = np.concatenate([labels, np.zeros((total - n,) + labels.shape[1:], labels.dtype)])
  for start in range(0, total, global_batch):
    sl = slice(start + process_index * local, start + (process_index + 1) * local)
    yield {'image': images[sl], 'label': labels[sl], 'mask': mask[sl].astype(np.int32)}


# ---------------------------------------------------------------------------------------------
# TFDS: ImageNet-style datasets. TensorFlow stays inside these functions.


def _tf():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')  # Keep TF off the accelerators JAX owns.
  return tf


def _tfds_builder(config):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.builder(config.name, data_dir=config.get('data_dir'))


def _process_split(split, process_index, process_count):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.split_for_jax_process(split, process_index=process_index,
                                    process_count=process_count)


def _decode_and_random_crop(tf, image_bytes, size):
  """Inception-style random-resized crop (area 8%-100%, aspect 3/4-4/3) and a random flip."""
  shape = tf.image.extract_jpeg_shape(image_bytes)
  begin, crop_size, _ = tf.image.sample_distorted_bounding_box(
      shape, bounding_boxes=tf.zeros([1, 0, 4]), min_object_covered=0.1,
      aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  y, x, _ = tf.unstack(begin)
  h, w, _ = tf.unstack(crop_size)
  image = tf.image.decode_and_crop_jpeg(image_bytes, tf.stack([y, x, h, w]), channels=3)
  image = tf.image.resize(image, (size, size), method='bicubic', antialias=True)
  image = tf.image.random_flip_left_right(image)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _decode_and_center_crop(tf, image_bytes, size, crop_fraction):
  """Resize-and-centre-crop for evaluation: the central ``crop_fraction`` of the shorter side."""
  shape = tf.image.extract_jpeg_shape(image_bytes)
  h, w = shape[0], shape[1]
  side = tf.cast(crop_fraction * tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
  y, x = (h - side + 1) // 2, (w - side + 1) // 2
  image = tf.image.decode_and_crop_jpeg(image_bytes, tf.stack([y, x, side, side]), channels=3)
  image = tf.image.resize(image, (size, size), method='bicubic', antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _tfds_train(config, global_batch, seed, process_index, process_count, start_step):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tf = _tf()
  if start_step:
    logging.warning('TFDS input is not resumed deterministically yet (a later issue): step %d '
                    'restarts from a fresh shuffle.', start_step)
  builder = _tfds_builder(config)
  split = _process_split(config.train_split, process_index, process_count)
  ds = builder.as_dataset(split=split, shuffle_files=True,
                          decoders={'image': tfds.decode.SkipDecoding()},
                          read_config=tfds.ReadConfig(shuffle_seed=seed + process_index))
  ds = ds.repeat().shuffle(config.get('shuffle_buffer', 10_000), seed=seed + process_index)

  def prepare(example):
    return {'image': _decode_and_random_crop(tf, example['image'], config.image_size),
            'label': tf.cast(example['label'], tf.int32)}

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch_size(global_batch, process_count), drop_remainder=True)
  return iter(tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE)))


def _tfds_eval(config, global_batch, process_index, process_count):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tf = _tf()
  builder = _tfds_builder(config)
  local = local_batch_size(global_batch, process_count)
  sizes = [builder.info.splits[_process_split(config.eval_split, p, process_count)].num_examples
           for p in range(process_count)]
  batches = max(1, math.ceil(max(sizes) / local))  # The same count on every process.
  split = _process_split(config.eval_split, process_index, process_count)
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()})

  def prepare(example):
    return {'image': _decode_and_center_crop(tf, example['image'], config.image_size,
                                             config.get('crop_fraction', 0.875)),
            'label': tf.cast(example['label'], tf.int32), 'mask': tf.constant(1, tf.int32)}

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  pad = tf.data.Dataset.from_tensors({
      'image': tf.zeros((config.image_size, config.image_size, 3), tf.uint8),
      'label': tf.constant(0, tf.int32), 'mask': tf.constant(0, tf.int32)}).repeat()
  ds = ds.concatenate(pad).take(batches * local).batch(local)
  return iter(tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE)))


# ---------------------------------------------------------------------------------------------
# The interface the trainer uses.


def get_info(config) -> DatasetInfo:
  """Classes and split sizes; ``config`` is ``config.data``."""
  if config.name == 'digits':
    return DatasetInfo(10, len(_digits_arrays(8, 'train')[1]), len(_digits_arrays(8, 'test')[1]))
  info = _tfds_builder(config).info
  num_classes = config.get('num_classes') or info.features['label'].num_classes
  return DatasetInfo(num_classes, info.splits[config.train_split].num_examples,
                     info.splits[config.eval_split].num_examples)


def train_iterator(config, global_batch: int, *, seed: int, process_index: int = 0,
                   process_count: int = 1, start_step: int = 0) -> Iterator[Batch]:
  """An endless iterator of this process's share of each global training batch."""
  _log_unapplied(config)
  args = (config, global_batch, seed, process_index, process_count, start_step)
  if config.name == 'digits':
    return _digits_train(*args)
  return _tfds_train(*args)


def eval_iterator(config, global_batch: int, *, process_index: int = 0,
                  process_count: int = 1) -> Iterator[Batch]:
  """One pass over the eval split; the same number of batches on every process, padding masked."""
  if config.name == 'digits':
    images, labels = _digits_arrays(config.image_size, config.eval_split)
    return _pad_and_split(images, labels, global_batch, process_index, process_count)
  return _tfds_eval(config, global_batch, process_index, process_count)


def in_memory_eval_iterator(images: np.ndarray, labels: np.ndarray, global_batch: int, *,
                            process_index: int = 0, process_count: int = 1,
                            ) -> Iterator[Batch]:
  """Exact evaluation of arrays already in memory (tests, small custom sets)."""
  return _pad_and_split(images, labels, global_batch, process_index, process_count)

