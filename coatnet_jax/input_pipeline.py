"""The data interface: per-process numpy batches from digits, TFDS, TFRecords or class folders.

Every source yields this process's share of each global batch as a dict of numpy arrays:
``image`` (uint8, NHWC, RGB), ``label`` (int32), and for evaluation ``mask`` (1 for a real example,
0 for padding). Images stay uint8 until they reach the device, where ``steps.normalize`` is the ONE
place that turns pixels into model inputs; the transfer is 4x smaller that way.

Evaluation is exact: every process runs the same number of batches, padded with masked examples, so
the metrics count each example of the split once on any number of processes and devices.

Sources (``config.data.name``): 'digits' (in memory, no TF), 'tfrecords' (JFT-style multi-label,
coatnet_jax/data/tfrecords.py), 'folders' (class sub-folders, data/folders.py), anything else a
TFDS name (imagenet2012; imagenet21k, whose builder is data/imagenet21k.py). Train transforms are
paper Table 10's: Inception crop, flip, RandAugment(N, M) (data/randaugment.py), all in tf.data;
Mixup/CutMix run on the device (losses.mix). The train stream is a pure function of (seed, step):
see data/streams.py for how a restart at step k reproduces an uninterrupted run bit for bit.

TensorFlow is imported only inside the functions of the TF sources, and only when one is used:
the quickstart, the step and the model never import it.
"""

import dataclasses
import math
from typing import Iterator

from absl import logging
import numpy as np

from coatnet_jax.data import DataNotFoundError  # pylint: disable=unused-import (re-exported)

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  train_size: int
  eval_size: int
  skipped_images: int = 0  # Undecodable images left out of the splits (logged by name).
  class_names: tuple = ()  # Label i's name, for per-class metrics; () where the data has none.


def local_batch_size(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(f'Global batch {global_batch} is not divisible by {process_count} processes.')
  return global_batch // process_count


def num_eval_batches(split_size: int, global_batch: int) -> int:
  """Batches each process runs to see all ``split_size`` examples (the last ones padded)."""
  return max(1, math.ceil(split_size / global_batch))


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


def _digits_train(config, global_batch, seed, process_index, process_count, start_step,
                  eval_view=False):
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
    if config.get('max_shift', 0) and not eval_view:
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
# TFDS, TFRecords and class folders (coatnet_jax.data). TensorFlow stays inside these functions.

# data.name -> the coatnet_jax.data module whose Source reads it; any other name is a TFDS name.
SOURCES = {'tfrecords': 'tfrecords', 'folders': 'folders'}


def _tf():
  from coatnet_jax import cli  # pylint: disable=g-import-not-at-top
  tf = cli.import_tensorflow()  # Without its C++ start-up banners.
  tf.config.set_visible_devices([], 'GPU')  # Keep TF off the accelerators JAX owns.
  return tf


def _source(config):
  """The Source object for ``config.name``; raises DataNotFoundError (one line) if unprepared."""
  import importlib  # pylint: disable=g-import-not-at-top
  _tf()
  module = importlib.import_module('coatnet_jax.data.' + SOURCES.get(config.name, 'tfds_source'))
  return module.Source(config)


def eval_protocol(config) -> dict:
  """The eval transform of a run (``config.data``), as data: what the eval pipeline applies, what
  ``tools.export`` records and what ``predict`` applies to image files (data.transforms.eval_image).

  ``crop_fraction`` < 1 centre-crops (pre-training); None resizes the whole image without a crop
  (fine-tuning, paper Table 10; a crop_fraction of 1 or more means the same). The digits are
  upsampled by nearest neighbour and never cropped.
  """
  if config.name == 'digits':
    return {'crop_fraction': None, 'resize_method': 'nearest'}
  crop = config.get('crop_fraction', 0.875)
  return {'crop_fraction': None if crop is None or crop >= 1 else float(crop),
          'resize_method': config.get('eval_resize_method', 'bicubic')}


def _as_numpy(ds):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return iter(tfds.as_numpy(ds))


def _tf_train(config, global_batch, seed, process_index, process_count, start_step,
              eval_view=False):
  from coatnet_jax.data import streams  # pylint: disable=g-import-not-at-top
  from coatnet_jax.data import transforms  # pylint: disable=g-import-not-at-top
  source = _source(config)
  ra = config.get('randaugment') or {}
  local = local_batch_size(global_batch, process_count)
  n_local = source.local_train_size(config.train_split, process_index, process_count)

  protocol = eval_protocol(config)

  def transform(image_bytes, example_seed):
    if eval_view:
      return transforms.eval_image(image_bytes, config.image_size, protocol['crop_fraction'],
                                   protocol['resize_method'])
    return streams.train_transform(
        image_bytes, example_seed, image_size=config.image_size,
        randaugment_layers=ra.get('num_layers', 0), randaugment_magnitude=ra.get('magnitude', 0),
        resize_method=config.get('train_resize_method', 'bilinear'),
        crop_area=tuple(config.get('crop_area', (0.08, 1.0))),
        crop_aspect=tuple(config.get('crop_aspect', (3 / 4, 4 / 3))),
        hflip=config.get('hflip', True), vflip=config.get('vflip', False),
        rot90=config.get('rot90', False))

  logging.info('Train stream of %s[%s]: %d examples on process %d, from step %d (epoch %d).',
               config.name, config.train_split, n_local, process_index, start_step,
               start_step * local // n_local)
  ds = streams.train_dataset(
      source.epoch_fn(config.train_split, process_index, process_count, seed=seed,
                      shuffle_buffer=config.get('shuffle_buffer', 10_000)),
      n_local, local, seed=seed, process_index=process_index, start_step=start_step,
      transform=transform, prepare_label=source.prepare_label)
  return _as_numpy(ds)


def _tf_eval(config, global_batch, process_index, process_count):
  from coatnet_jax.data import streams  # pylint: disable=g-import-not-at-top
  from coatnet_jax.data import transforms  # pylint: disable=g-import-not-at-top
  source = _source(config)
  local = local_batch_size(global_batch, process_count)
  protocol = eval_protocol(config)
  ds = streams.eval_dataset(
      source.ordered(config.eval_split, process_index, process_count),
      source.local_eval_sizes(config.eval_split, process_count), local,
      transform=lambda b: transforms.eval_image(b, config.image_size, protocol['crop_fraction'],
                                                protocol['resize_method']),
      prepare_label=source.prepare_label, image_size=config.image_size,
      blank_label=source.blank_label())
  return _as_numpy(ds)


# ---------------------------------------------------------------------------------------------
# The interface the trainer uses.


def get_info(config) -> DatasetInfo:
  """Classes and split sizes; ``config`` is ``config.data``."""
  if config.name == 'digits':
    return DatasetInfo(10, len(_digits_arrays(8, 'train')[1]), len(_digits_arrays(8, 'test')[1]),
                       class_names=tuple(str(d) for d in range(10)))
  source = _source(config)
  train_size, eval_size = source.size(config.train_split), source.size(config.eval_split)
  skipped = sum(getattr(source, 'skipped', {}).values())
  return DatasetInfo(source.num_classes, train_size, eval_size, skipped,
                     tuple(getattr(source, 'classes', ())))


def train_label_counts(config) -> np.ndarray:
  """Examples per class in the train split (for class-balanced loss weights); ``config.data``."""
  if config.name == 'digits':
    return np.bincount(_digits_arrays(8, 'train')[1], minlength=10)
  source = _source(config)
  if not hasattr(source, 'label_counts'):
    raise ValueError(f'Class weights need per-class counts, which {config.name!r} data does not '
                     f'give; use class folders (data.name=folders) or drop loss.class_weights.')
  return source.label_counts(config.train_split)


def label_spec(config, num_classes: int):
  """(per-example shape, numpy dtype) of batch['label']: multi-hot float32 for multi-label
  TFRecords, else a scalar int32. For the trainer's abstract batches (ahead-of-time compile)."""
  if config.name == 'tfrecords' and config.get('multi_label', True):
    return (num_classes,), np.float32
  return (), np.int32


def train_iterator(config, global_batch: int, *, seed: int, process_index: int = 0,
                   process_count: int = 1, start_step: int = 0) -> Iterator[Batch]:
  """An endless iterator of this process's share of each global training batch.

  A pure function of (config, seed, process, step): ``start_step=k`` yields exactly the batches
  an uninterrupted run yields from step k on, so a checkpoint needs no iterator state.
  """
  args = (config, global_batch, seed, process_index, process_count, start_step)
  if config.name == 'digits':
    return _digits_train(*args)
  return _tf_train(*args)


def batchnorm_iterator(config, global_batch: int, *, seed: int, process_index: int = 0,
                       process_count: int = 1) -> Iterator[Batch]:
  """Batches of the train split in the train stream's shuffled order, through the EVAL
  transform (no augmentation), for BatchNorm's population statistics (batchnorm_stats.py)."""
  args = (config, global_batch, seed, process_index, process_count, 0)
  if config.name == 'digits':
    return _digits_train(*args, eval_view=True)
  return _tf_train(*args, eval_view=True)


def eval_iterator(config, global_batch: int, *, process_index: int = 0,
                  process_count: int = 1) -> Iterator[Batch]:
  """One pass over the eval split; the same number of batches on every process, padding masked."""
  if config.name == 'digits':
    images, labels = _digits_arrays(config.image_size, config.eval_split)
    return _pad_and_split(images, labels, global_batch, process_index, process_count)
  return _tf_eval(config, global_batch, process_index, process_count)


def in_memory_eval_iterator(images: np.ndarray, labels: np.ndarray, global_batch: int, *,
                            process_index: int = 0, process_count: int = 1,
                            ) -> Iterator[Batch]:
  """Exact evaluation of arrays already in memory (tests, small custom sets)."""
  return _pad_and_split(images, labels, global_batch, process_index, process_count)

