"""The data interface: per-process numpy batches from digits, TFDS, TFRecords or class folders.

Every source yields this process's share of each global batch as a dict of numpy arrays:
``image`` (uint8, NHWC, RGB), ``label`` (int32), and for evaluation ``mask`` (1 for a real example,
0 for padding). Images stay uint8 until they reach the device, where ``steps.normalize`` is the ONE
place that turns pixels into model inputs; the transfer is 4x smaller that way.

Evaluation is exact: every process runs the same number of batches, padded with masked examples, so
the metrics count each example of the split once on any number of processes and devices.

Sources (``config.data.name``, the table ``SOURCES``): 'digits' (in memory, no TF,
data/digits.py), 'tfrecords' (JFT-style multi-label, data/tfrecords.py), 'folders' (class
sub-folders, data/folders.py), anything else a TFDS name (imagenet2012; imagenet21k, whose builder
is data/imagenet21k.py). Each implements the contract ``data.source.DataSource``; the TF ones share
their tf.data streams (data/tf_source.py). Train transforms are paper Table 10's: Inception crop,
flip, RandAugment(N, M) (data/randaugment.py), all in tf.data; Mixup/CutMix run on the device
(losses.mix). The train stream is a pure function of (seed, step): see data/streams.py for how a
restart at step k reproduces an uninterrupted run bit for bit.

TensorFlow is imported only when a TF source first reads data: the quickstart, the step and the
model never import it.
"""

from typing import Iterator

import numpy as np

from coatnet_jax.data import digits
from coatnet_jax.data import source
from coatnet_jax.data import tf_source


# data.name -> its source; any other name is a TFDS name.
SOURCES = {'digits': digits.Digits, 'tfrecords': tf_source.TFRecords, 'folders': tf_source.Folders}


def data_source(config) -> source.DataSource:
  """The source of ``config.data``; builds it only (reads nothing, imports no TensorFlow)."""
  return SOURCES.get(config.name, tf_source.Tfds)(config)


def eval_protocol(config) -> dict:
  """The eval transform of a run (``config.data``), as data: what the eval pipeline applies, what
  ``tools.export`` records and what ``predict`` applies to image files (data.transforms.eval_image).

  ``crop_fraction`` < 1 centre-crops (pre-training); None resizes the whole image without a crop
  (fine-tuning, paper Table 10; a crop_fraction of 1 or more means the same). The digits are
  upsampled by nearest neighbour and never cropped.
  """
  return data_source(config).eval_protocol()


def get_info(config) -> source.DatasetInfo:
  """Classes and split sizes; ``config`` is ``config.data``. Raises DataNotFoundError (one line)
  for data that is missing or unprepared."""
  return data_source(config).info()


def train_label_counts(config) -> np.ndarray:
  """Examples per class in the train split (for class-balanced loss weights); ``config.data``."""
  return data_source(config).train_label_counts()


def label_spec(config, num_classes: int):
  """(per-example shape, numpy dtype) of batch['label']: multi-hot float32 for multi-label
  TFRecords, else a scalar int32. For the trainer's abstract batches (ahead-of-time compile)."""
  return data_source(config).label_spec(num_classes)


def train_iterator(config, global_batch: int, *, seed: int, process_index: int = 0,
                   process_count: int = 1, start_step: int = 0) -> Iterator[source.Batch]:
  """An endless iterator of this process's share of each global training batch.

  A pure function of (config, seed, process, step): ``start_step=k`` yields exactly the batches
  an uninterrupted run yields from step k on, so a checkpoint needs no iterator state.
  """
  return data_source(config).train_iterator(
      global_batch, seed=seed, process_index=process_index, process_count=process_count,
      start_step=start_step, eval_view=False)


def batchnorm_iterator(config, global_batch: int, *, seed: int, process_index: int = 0,
                       process_count: int = 1) -> Iterator[source.Batch]:
  """Batches of the train split in the train stream's shuffled order, through the EVAL
  transform (no augmentation), for BatchNorm's population statistics (batchnorm_stats.py)."""
  return data_source(config).train_iterator(
      global_batch, seed=seed, process_index=process_index, process_count=process_count,
      start_step=0, eval_view=True)


def eval_iterator(config, global_batch: int, *, process_index: int = 0,
                  process_count: int = 1) -> Iterator[source.Batch]:
  """One pass over the eval split; the same number of batches on every process, padding masked."""
  return data_source(config).eval_iterator(global_batch, process_index=process_index,
                                           process_count=process_count)
