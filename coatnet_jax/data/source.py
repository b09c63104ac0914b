"""The data-source contract: what ``input_pipeline`` needs from every dataset, digits included.

A source is built from ``config.data`` and answers in two kinds:
  * from the config alone, before any data is read (``label_spec``, ``eval_protocol``): the
    ahead-of-time compile (``tools/fit``), ``tools/export`` and the abstract batches of the
    trainer ask these on the step path, where no file may be read and TensorFlow is never imported;
  * from the data (``info``, ``train_label_counts``, the three streams): these may read files and,
    for the TF sources (data/tf_source.py), import TensorFlow, on first use.
Building a source is therefore cheap and side-effect free; ``input_pipeline.SOURCES`` names every
source by ``config.data.name``.

The streams yield this process's share of each global batch as numpy arrays: ``image`` uint8 NHWC
RGB, ``label`` of ``label_spec``, and for evaluation ``mask`` (1 a real example, 0 padding).
"""

import dataclasses
import math
from typing import Iterator, Protocol, runtime_checkable

import numpy as np

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  train_size: int
  eval_size: int
  skipped_images: int = 0  # Undecodable images left out of the splits (logged by name).
  class_names: tuple = ()  # Label i's name, for per-class metrics; () where the data has none.


@runtime_checkable
class DataSource(Protocol):
  """One dataset behind ``input_pipeline``, built from ``config.data`` alone: building it reads
  nothing and imports no TensorFlow; the methods that need data do (module docstring)."""

  def label_spec(self, num_classes: int) -> tuple[tuple[int, ...], type]:
    """(per-example shape, numpy dtype) of ``batch['label']``, for abstract batches."""

  def eval_protocol(self) -> dict:
    """The eval transform as data, ``{'crop_fraction': float or None, 'resize_method': str}``:
    what the eval stream applies and what an export records for ``predict`` to apply again."""

  def info(self) -> DatasetInfo:
    """Classes, split sizes, images left out and class names."""

  def train_label_counts(self) -> np.ndarray:
    """Examples per class in the train split (class-balanced loss weights). A source that cannot
    count raises a one-line ValueError that says what to use instead."""

  def train_iterator(self, global_batch: int, *, seed: int, process_index: int,
                     process_count: int, start_step: int, eval_view: bool) -> Iterator[Batch]:
    """The endless train stream from ``start_step``, a pure function of (seed, process, step), so
    a checkpoint needs no iterator state. ``eval_view``: the same order through the eval
    transform, without augmentation (BatchNorm population statistics)."""

  def eval_iterator(self, global_batch: int, *, process_index: int,
                    process_count: int) -> Iterator[Batch]:
    """One pass over the eval split: the same number of batches on every process, padding
    masked, so every example counts exactly once on any number of processes."""


def local_batch_size(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(f'Global batch {global_batch} is not divisible by {process_count} processes.')
  return global_batch // process_count


def num_eval_batches(split_size: int, global_batch: int) -> int:
  """Batches each process runs to see all ``split_size`` examples (the last ones padded)."""
  return max(1, math.ceil(split_size / global_batch))

