"""The 1,797 8x8 digits that scikit-learn ships, in memory: the quickstart's and the tests' data.

A whole source in numpy, so that the quickstart, the step and the model run without TensorFlow.
The images are upsampled by nearest neighbour to ``data.image_size`` (a multiple of 8) and never
cropped; ``data.max_shift`` is their only augmentation.
"""

from typing import Iterator

import numpy as np

from coatnet_jax.data import source

NUM_CLASSES = 10


def arrays(image_size: int, split: str):
  """The fixed 80/20 split of sklearn's digits, as uint8 RGB at ``image_size`` and int32 labels;
  ``split`` 'test' is the 20%, any other name the 80%."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images, labels = digits.images, digits.target.astype(np.int32)  # (1797, 8, 8), values 0..16.
  # A fixed stratified split: the same 1,437 / 360 examples on every machine and every run.
  order = np.random.RandomState(0).permutation(len(labels))
  test = np.zeros(len(labels), bool)
  for c in range(NUM_CLASSES):
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


def _shift(images, max_shift, shifts):
  """Moves image j by ``shifts[j] - max_shift`` pixels (zero fill): a cheap digits augmentation."""
  _, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
  return np.stack([p[dy:dy + h, dx:dx + w] for p, (dy, dx) in zip(padded, shifts)])


def padded_batches(images, labels, global_batch, process_index, process_count
                   ) -> Iterator[source.Batch]:
  """Exact evaluation of an in-memory split: pad to whole global batches, mask the padding."""
  n = len(labels)
  local = source.local_batch_size(global_batch, process_count)
  total = source.num_eval_batches(n, global_batch) * global_batch
  mask = np.arange(total) < n
  images = np.concatenate([images, np.zeros((total - n,) + images.shape[1:], images.dtype)])
  labels = np.concatenate([labels, np.zeros((total - n,) + labels.shape[1:], labels.dtype)])
  for start in range(0, total, global_batch):
    sl = slice(start + process_index * local, start + (process_index + 1) * local)
    yield {'image': images[sl], 'label': labels[sl], 'mask': mask[sl].astype(np.int32)}


class Digits:
  """The digits as a ``source.DataSource``."""

  def __init__(self, config):
    self.config = config

  def label_spec(self, num_classes):
    del num_classes
    return (), np.int32

  def eval_protocol(self):
    return {'crop_fraction': None, 'resize_method': 'nearest'}

  def info(self):
    return source.DatasetInfo(NUM_CLASSES, len(arrays(8, 'train')[1]), len(arrays(8, 'test')[1]),
                              class_names=tuple(str(d) for d in range(NUM_CLASSES)))

  def train_label_counts(self):
    return np.bincount(arrays(8, 'train')[1], minlength=NUM_CLASSES)

  def train_iterator(self, global_batch, *, seed, process_index, process_count, start_step,
                     eval_view):
    config = self.config
    images, labels = arrays(config.image_size, 'train')
    local = source.local_batch_size(global_batch, process_count)
    steps_per_epoch = len(labels) // global_batch
    if steps_per_epoch == 0:
      raise ValueError(f'Batch {global_batch} exceeds the {len(labels)} training digits.')
    step = start_step  # Deterministic in the step, so a resumed run sees the same batches.
    while True:
      epoch, i = divmod(step, steps_per_epoch)
      perm = np.random.default_rng((seed, epoch)).permutation(len(labels))
      # Indices and shifts are drawn for the global batch, then sliced: the same global batch on
      # any number of processes.
      mine = slice(process_index * local, (process_index + 1) * local)
      idx = perm[i * global_batch:(i + 1) * global_batch][mine]
      batch_images = images[idx]
      if config.max_shift and not eval_view:
        shifts = np.random.default_rng((seed, step, 1)).integers(
            0, 2 * config.max_shift + 1, size=(global_batch, 2))[mine]
        batch_images = _shift(batch_images, config.max_shift, shifts)
      yield {'image': batch_images, 'label': labels[idx]}
      step += 1

  def eval_iterator(self, global_batch, *, process_index, process_count):
    images, labels = arrays(self.config.image_size, self.config.eval_split)
    return padded_batches(images, labels, global_batch, process_index, process_count)
