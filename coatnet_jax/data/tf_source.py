"""The TensorFlow sources: any TFDS dataset, JFT-style TFRecords and class folders.

The three differ only in how they find and read their records; from records to batches (decode,
the Table 10 train view, the deterministic (seed, step) stream, exact padded evaluation) the code
is the same tf.data (streams.py). So one base, ``TFSource``, implements ``source.DataSource`` on
top of a ``Reader``, the record-level contract that tfds_source.py, tfrecords.py and folders.py
each fill. This module imports no TensorFlow itself: a source opens its reader, and TensorFlow
with it, the first time it needs data, so that ``label_spec`` and ``eval_protocol`` answer on the
step and export paths without it.
"""

import abc
from typing import Protocol

from absl import logging
import numpy as np

from coatnet_jax.data import source


class Reader(Protocol):
  """The records of one dataset, per split and per process; a split is whatever the source names
  one by (a TFDS split, a sub-folder, a file glob). Records are {'image': encoded bytes, 'label':
  the raw label}, turned into batches by ``TFSource`` through streams.py."""

  num_classes: int
  classes: tuple  # Label i's name; () where the data names none.
  skipped: dict  # split -> undecodable images left out before stream positions are assigned.

  def size(self, split: str) -> int:
    """Usable examples of the whole split (fills ``skipped[split]``)."""

  def local_train_size(self, split: str, process_index: int, process_count: int) -> int:
    """Examples of this process's part of the train stream."""

  def epoch_fn(self, split: str, process_index: int, process_count: int, *, seed: int,
               shuffle_buffer: int):
    """epoch (int64 tensor) -> this process's records, each once, in an order fixed by (seed,
    epoch): what makes the train stream a pure function of the step (streams.train_dataset)."""

  def local_eval_sizes(self, split: str, process_count: int) -> list:
    """Examples of every process's part of the eval split, to pad all to the same batches."""

  def ordered(self, split: str, process_index: int, process_count: int):
    """This process's part of the split, each record once, in a fixed order (evaluation)."""

  def prepare_label(self, label):
    """A record's raw label -> the tensor ``TFSource.label_spec`` describes."""


class TFSource(abc.ABC):
  """``source.DataSource`` for a TF reader; subclasses name the reader in ``_open``."""

  def __init__(self, config):
    self.config = config
    self._reader = None

  @abc.abstractmethod
  def _open(self) -> Reader:
    """This source's record reader (its module imports TensorFlow, hence opened on first use)."""

  @property
  def reader(self) -> Reader:
    """The reader, opened once; raises DataNotFoundError (one line) if the data is unprepared."""
    if self._reader is None:
      from coatnet_jax import cli  # pylint: disable=g-import-not-at-top
      tf = cli.import_tensorflow()  # Without its C++ start-up banners.
      tf.config.set_visible_devices([], 'GPU')  # Keep TF off the accelerators JAX owns.
      self._reader = self._open()
    return self._reader

  def label_spec(self, num_classes):
    del num_classes
    return (), np.int32

  def eval_protocol(self):
    """Centre crop of ``data.crop_fraction`` (pre-training); None, or 1 and more, resizes the
    whole image without a crop (fine-tuning, paper Table 10)."""
    crop = self.config.crop_fraction
    return {'crop_fraction': None if crop is None or crop >= 1 else float(crop),
            'resize_method': self.config.eval_resize_method}

  def info(self):
    reader, config = self.reader, self.config
    train_size, eval_size = reader.size(config.train_split), reader.size(config.eval_split)
    return source.DatasetInfo(reader.num_classes, train_size, eval_size,
                              sum(reader.skipped.values()), tuple(reader.classes))

  def train_label_counts(self):
    raise ValueError(f'Class weights need per-class counts, which {self.config.name!r} data does '
                     f'not give; use class folders (data.name=folders) or drop '
                     f'loss.class_weights.')

  def _eval_transform(self):
    from coatnet_jax.data import transforms  # pylint: disable=g-import-not-at-top
    protocol, size = self.eval_protocol(), self.config.image_size
    return lambda image_bytes: transforms.eval_image(
        image_bytes, size, protocol['crop_fraction'], protocol['resize_method'])

  def _train_transform(self):
    from coatnet_jax.data import streams  # pylint: disable=g-import-not-at-top
    config = self.config
    return lambda image_bytes, example_seed: streams.train_transform(
        image_bytes, example_seed, image_size=config.image_size,
        randaugment_layers=config.randaugment.num_layers,
        randaugment_magnitude=config.randaugment.magnitude,
        resize_method=config.train_resize_method, crop_area=tuple(config.crop_area),
        crop_aspect=tuple(config.crop_aspect), hflip=config.hflip, vflip=config.vflip,
        rot90=config.rot90)

  def train_iterator(self, global_batch, *, seed, process_index, process_count, start_step,
                     eval_view):
    reader, config = self.reader, self.config  # First: TensorFlow imported without banners.
    from coatnet_jax.data import streams  # pylint: disable=g-import-not-at-top
    local = source.local_batch_size(global_batch, process_count)
    n_local = reader.local_train_size(config.train_split, process_index, process_count)
    if eval_view:
      view = self._eval_transform()
      transform = lambda image_bytes, example_seed: view(image_bytes)
    else:
      transform = self._train_transform()
    logging.info('Train stream of %s[%s]: %d examples on process %d, from step %d (epoch %d).',
                 config.name, config.train_split, n_local, process_index, start_step,
                 start_step * local // n_local)
    ds = streams.train_dataset(
        reader.epoch_fn(config.train_split, process_index, process_count, seed=seed,
                        shuffle_buffer=config.shuffle_buffer),
        n_local, local, seed=seed, process_index=process_index, start_step=start_step,
        transform=transform, prepare_label=reader.prepare_label)
    return _as_numpy(ds)

  def eval_iterator(self, global_batch, *, process_index, process_count):
    reader, config = self.reader, self.config
    from coatnet_jax.data import streams  # pylint: disable=g-import-not-at-top
    ds = streams.eval_dataset(
        reader.ordered(config.eval_split, process_index, process_count),
        reader.local_eval_sizes(config.eval_split, process_count),
        source.local_batch_size(global_batch, process_count),
        transform=self._eval_transform(), prepare_label=reader.prepare_label,
        image_size=config.image_size,
        blank_label=np.zeros(*self.label_spec(reader.num_classes)))
    return _as_numpy(ds)


def _as_numpy(ds):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return iter(tfds.as_numpy(ds))


class Tfds(TFSource):
  """Any TFDS dataset (imagenet2012; imagenet21k, built by data/imagenet21k.py): tfds_source.py."""

  def _open(self):
    from coatnet_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
    return tfds_source.Reader(self.config)


class TFRecords(TFSource):
  """JFT-style TFRecords by glob (tfrecords.py): multi-hot float32 labels, or with
  ``data.multi_label = False`` the first label as int32."""

  def _open(self):
    from coatnet_jax.data import tfrecords  # pylint: disable=g-import-not-at-top
    return tfrecords.Reader(self.config)

  def label_spec(self, num_classes):
    if self.config.multi_label:
      return (num_classes,), np.float32
    return (), np.int32


class Folders(TFSource):
  """A directory of class sub-folders (folders.py), the one source that counts its classes."""

  def _open(self):
    from coatnet_jax.data import folders  # pylint: disable=g-import-not-at-top
    return folders.Reader(self.config)

  def train_label_counts(self):
    return self.reader.label_counts(self.config.train_split)
