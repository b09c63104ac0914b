"""A directory of class sub-folders, for a user's own small data, in one of two layouts.

  DATA_DIR/train/<class name>/<image>   (.jpg/.jpeg/.png/.gif/.bmp/.webp; decoded by content)
  DATA_DIR/val/<class name>/<image>

``data.name = 'folders'``, ``data.train_split = 'train'``, ``data.eval_split = 'val'`` (the
sub-directory names). Classes are the sorted sub-folder names of the train split, label i for the
i-th; the eval split may lack some classes but may not add new ones.

  DATA_DIR/<class name>/<image>         (no split folders, as GasHisSDB and most small sets ship)

When DATA_DIR/<train_split> does not exist and DATA_DIR has no folder named train, val,
validation or test, the sub-folders of DATA_DIR are the classes and the splits are 'train', 'val'
and 'test', drawn by a stable hash of each image's path relative to DATA_DIR ('<class>/<name>'):
bucket = int(sha256(relpath).hexdigest(), 16) % 100 and, with ``data.split_percent = (80, 10,
10)`` (the default), buckets [0, 80) are train, [80, 90) val and [90, 100) test. A file's split
depends on its own path only: adding or removing other files, or moving DATA_DIR, moves nothing
between splits, so a test set stays unseen as the data grows.

In either layout each process takes an even, contiguous part of a fixed (seed 0) shuffle of the
sorted file list; each training epoch is a permutation of that part drawn from (seed, epoch), by
index.

Every image is decoded once when a split is first listed (small data: seconds); files that do not
decode (truncated, not an image) are left out of the split, logged by name and counted
(``Reader.skipped``), so that the stream positions, and with them bit-exact resume, do not
depend on failures at training time. CMYK and grey JPEGs and PNG bytes under a .JPEG name
decode fine and stay. Files above ``image_limits`` (declared bytes, or pixels in the header) are
refused before decoding and counted the same way.

Hidden entries (names starting with '.', e.g. .ipynb_checkpoints, .DS_Store) are neither classes
nor images; other files without an image extension are ignored with one log line. A train split
with fewer than two classes, or with a class folder that holds no (decodable) image, is refused
in one line.
"""

import hashlib
import os

from absl import logging
import numpy as np
import tensorflow as tf

from coatnet_jax.data import DataNotFoundError
from coatnet_jax.data import image_limits
from coatnet_jax.data import transforms

EXTENSIONS = image_limits.EXTENSIONS
LAYOUT = 'DATA_DIR/<split>/<class>/<image files> or DATA_DIR/<class>/<image files>'
SPLIT_FOLDERS = ('train', 'val', 'validation', 'test')
HASH_SPLITS = ('train', 'val', 'test')  # The splits of the flat layout, in bucket order.


def _visible(names):
  """Hidden entries (.ipynb_checkpoints, .DS_Store, ._x.jpg) are never classes nor images."""
  return [n for n in names if not n.startswith('.')]


def _images(folder, ignored=None):
  """Image files of ``folder`` by extension; other visible files are added to ``ignored``."""
  names = _visible(sorted(tf.io.gfile.listdir(folder)))
  images = [n for n in names if n.lower().endswith(EXTENSIONS)]
  if ignored is not None:
    ignored.extend(os.path.join(folder, n) for n in names
                   if n not in images and not tf.io.gfile.isdir(os.path.join(folder, n)))
  return images


def bucket(relpath: str) -> int:
  """The flat layout's stable hash bucket in [0, 100) of a path relative to DATA_DIR."""
  return int(hashlib.sha256(relpath.encode('utf-8')).hexdigest(), 16) % 100


def _is_flat(root, split):
  return not any(tf.io.gfile.isdir(os.path.join(root, d)) for d in (split,) + SPLIT_FOLDERS)


def _split_ranges(percent):
  """{'train': (0, 80), 'val': (80, 90), 'test': (90, 100)} from ``data.split_percent``."""
  percent = tuple(int(p) for p in percent)
  if len(percent) != len(HASH_SPLITS) or min(percent) < 0 or sum(percent) != 100:
    raise ValueError(f'data.split_percent={percent} must be three percentages (train, val, '
                     'test) that add up to 100.')
  ends = np.cumsum((0,) + percent)
  return {s: (int(ends[i]), int(ends[i + 1])) for i, s in enumerate(HASH_SPLITS)}


def _classes(root):
  if not tf.io.gfile.isdir(root):
    raise DataNotFoundError(f'No directory {root}; lay out images as {LAYOUT}.')
  classes = sorted(d.rstrip('/') for d in _visible(tf.io.gfile.listdir(root))
                   if tf.io.gfile.isdir(os.path.join(root, d)))
  if not classes:
    raise DataNotFoundError(f'{root} has no class sub-folders; lay out images as '
                                        f'{LAYOUT}.')
  return classes


_LISTS, _SKIPPED = {}, {}  # root -> split -> lists / skipped count: decode-checked once.


def _too_large(path):
  """Why ``path`` is above ``image_limits`` (declared bytes or header pixels), or None."""
  why = image_limits.too_many_bytes(tf.io.gfile.stat(path).length)
  if why is None:
    with tf.io.gfile.GFile(path, 'rb') as f:
      why = image_limits.too_large(f)
  return why


def _decodable(paths):
  """A boolean per path: does it decode? Files above the image limits are refused from their
  header first; the rest go through one parallel tf.data decode pass, failures dropped."""
  good = np.zeros(len(paths), bool)
  small = []
  for i, p in enumerate(paths):
    why = _too_large(p)
    if why:
      logging.warning('Skipping %s: %s.', p, why)
    else:
      small.append(i)
  small = np.array(small, np.int64)
  if not len(small):
    return good
  ds = tf.data.Dataset.from_tensor_slices((small, np.asarray(paths)[small]))
  ds = ds.map(lambda i, p: (i, tf.shape(transforms.decode(tf.io.read_file(p)))[0]),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
  for i, _ in ds.as_numpy_iterator():
    good[i] = True
  for i in small[~good[small]]:
    logging.warning('Skipping %s: it does not decode as an image.', paths[i])
  return good


def _log_ignored(ignored):
  if ignored:
    logging.warning('Ignored %d file(s) that are not images by their extension (%s), e.g. %s.',
                    len(ignored), ', '.join(EXTENSIONS), ignored[0])


class Reader:
  """``tf_source.Reader`` for class folders: lists files once per split; everything else is index
  arithmetic."""

  def __init__(self, config):
    self.config = config
    self.root = config.data_dir or ''
    self.flat = _is_flat(self.root, config.train_split)
    self._ranges = _split_ranges(config.split_percent) if self.flat else None
    self.classes = _classes(self.root if self.flat else
                            os.path.join(self.root, config.train_split))
    self.num_classes = len(self.classes)
    where = self.root if self.flat else os.path.join(self.root, config.train_split)
    if self.num_classes < 2:
      raise ValueError(f'{where} has {self.num_classes} class folder ({self.classes[0]}): a '
                       f'classifier needs at least two; lay out images as {LAYOUT}.')
    empty = [c for c in self.classes if not _images(os.path.join(where, c))]
    if empty:
      raise ValueError(f'Class folder(s) {", ".join(os.path.join(where, c) for c in empty[:5])} '
                       f'hold no image files ({", ".join(EXTENSIONS)}); add images or remove '
                       f'the folder(s).')
    key = (self.root, tuple(self._ranges.values()) if self.flat else None)
    self._lists = _LISTS.setdefault(key, {})
    self.skipped = _SKIPPED.setdefault(key, {})

  def _listing(self, split):
    """(paths, labels) of every image file of ``split``, in sorted order, before decoding."""
    paths, labels, ignored = [], [], []
    if self.flat:
      if split not in self._ranges:
        raise DataNotFoundError(f'{self.root} has no split folders, so its splits are drawn by '
                                f'hash: split {split!r} is not one of {", ".join(HASH_SPLITS)}.')
      lo, hi = self._ranges[split]
      for label, c in enumerate(self.classes):
        for name in _images(os.path.join(self.root, c), ignored):
          if lo <= bucket(f'{c}/{name}') < hi:
            paths.append(os.path.join(self.root, c, name))
            labels.append(label)
      _log_ignored(ignored)
      return paths, labels
    root = os.path.join(self.root, split)
    index = {c: i for i, c in enumerate(self.classes)}
    for c in _classes(root):
      if c not in index:
        raise ValueError(f'{root}/{c} is not a class of the train split.')
      for name in _images(os.path.join(root, c), ignored):
        paths.append(os.path.join(root, c, name))
        labels.append(index[c])
    _log_ignored(ignored)
    return paths, labels

  def files(self, split):
    if split not in self._lists:
      root = self.root if self.flat else os.path.join(self.root, split)
      paths, labels = self._listing(split)
      if not paths:
        raise DataNotFoundError(f'{root} holds no images for split {split!r}; lay out images as '
                                f'{LAYOUT}.')
      paths, labels = np.array(paths), np.array(labels, np.int32)
      good = _decodable(paths)
      self.skipped[split] = int((~good).sum())
      if self.skipped[split]:
        logging.warning('%s: skipped %d undecodable or too large of %d files.', root,
                        self.skipped[split], len(paths))
      paths, labels = paths[good], labels[good]
      if split == self.config.train_split:
        lost = [c for i, c in enumerate(self.classes) if not np.any(labels == i)]
        if lost:
          raise ValueError(f'{root}: class(es) {", ".join(lost[:5])} have no decodable image in '
                           f'split {split!r}; add images or remove the folder(s).')
      order = np.random.RandomState(0).permutation(len(paths))
      self._lists[split] = (paths[order], labels[order])
    return self._lists[split]

  def size(self, split):
    return len(self.files(split)[0])

  def label_counts(self, split) -> np.ndarray:
    """Examples per class among the decodable files of ``split``, for class-balanced weights."""
    return np.bincount(self.files(split)[1], minlength=self.num_classes)

  def _local(self, split, process_index, process_count):
    paths, labels = self.files(split)
    parts = np.array_split(np.arange(len(paths)), process_count)[process_index]
    return paths[parts], labels[parts]

  def local_train_size(self, split, process_index, process_count):
    return len(self._local(split, process_index, process_count)[0])

  def epoch_fn(self, split, process_index, process_count, *, seed, shuffle_buffer):
    del shuffle_buffer  # A full permutation: index access needs no buffer.
    paths, labels = (tf.constant(a) for a in self._local(split, process_index, process_count))
    n = int(paths.shape[0])

    def fn(epoch):
      order = tf.random.experimental.stateless_shuffle(
          tf.range(n), seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
      ds = tf.data.Dataset.from_tensor_slices(order)
      return ds.map(lambda i: {'image': tf.io.read_file(paths[i]), 'label': labels[i]},
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    return fn

  def local_eval_sizes(self, split, process_count):
    n = self.size(split)
    return [len(a) for a in np.array_split(np.arange(n), process_count)]

  def ordered(self, split, process_index, process_count):
    paths, labels = self._local(split, process_index, process_count)
    ds = tf.data.Dataset.from_tensor_slices({'image': paths, 'label': labels})
    return ds.map(lambda e: {'image': tf.io.read_file(e['image']), 'label': e['label']},
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def prepare_label(self, label):
    return tf.cast(label, tf.int32)
