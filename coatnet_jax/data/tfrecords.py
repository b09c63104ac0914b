r"""JFT-style multi-label data: sharded TFRecord files of ``tf.train.Example`` read by glob.

Schema (one record per image):
  image/encoded       bytes     the encoded image (JPEG, PNG, ...; decoded whatever the name says)
  image/class/label   int64[]   the image's labels, any number of them (0 <= label < num_classes)

Config: ``data.name = 'tfrecords'``, ``data.data_dir`` the directory, ``data.train_split`` and
``data.eval_split`` file globs relative to it (e.g. ``train-*.tfrecord``), ``data.num_classes``.
Labels come out multi-hot float32 [num_classes] (``data.multi_label = False`` gives the first
label as int32 instead). Every process reads whole files of the train glob (file i goes to
process i mod P, so have at least as many files as processes); evaluation shards records, so it
is exact for any file count.

Example counts: ``counts.json`` ({file name: records}) next to the files is used if present;
otherwise the files are counted once at start (a full read). Write it once with
  python -m coatnet_jax.data.tfrecords --write_counts 'DIR/train-*.tfrecord'
and write records with ``make_example``. The same command decodes every image once and lists
the records that do not decode in ``bad_records.json`` ({file name: [record index]}); readers
leave those records out before positions are assigned and count them (``Reader.skipped``).
Without that file, an undecodable record is found at training time, logged, and its stream
position filled by the next decodable example (``streams.train_dataset``): positions never
shift, so bit-exact resume holds either way; only the count is then not known in advance.
"""

import json
import os

from absl import logging

from coatnet_jax import cli

tf = cli.import_tensorflow()  # Without its C++ start-up banners.

from coatnet_jax.data import DataNotFoundError

IMAGE_KEY = 'image/encoded'
LABEL_KEY = 'image/class/label'
COUNTS = 'counts.json'
BAD = 'bad_records.json'


def make_example(image_bytes: bytes, labels) -> bytes:
  """One serialized record of the schema, for users writing their own corpus."""
  return tf.train.Example(features=tf.train.Features(feature={
      IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_bytes])),
      LABEL_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=list(labels))),
  })).SerializeToString()


def parse(record):
  ex = tf.io.parse_single_example(record, {IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
                                           LABEL_KEY: tf.io.VarLenFeature(tf.int64)})
  return {'image': ex[IMAGE_KEY], 'label': tf.sparse.to_dense(ex[LABEL_KEY])}


def files(data_dir, pattern):
  path = os.path.join(data_dir or '', pattern)
  found = sorted(tf.io.gfile.glob(path))
  if not found:
    raise DataNotFoundError(
        f'No TFRecord files match {path}; write them with coatnet_jax.data.tfrecords.make_example '
        f'(schema in its docstring).')
  return found


def bad_records(paths):
  """{path: sorted record indices that do not decode}, from bad_records.json beside the files."""
  out = {}
  for p in paths:
    known = _read_counts(os.path.join(os.path.dirname(p), BAD))
    out[p] = sorted(known.get(os.path.basename(p), []))
  return out


def usable(paths):
  """Records per file that the readers use: the count less the known bad records."""
  bad = bad_records(paths)
  return {p: n - len(bad[p]) for p, n in count(paths).items()}


def _reader(paths):
  """i -> the records of paths[i] less its known bad ones; i indexes the tf.constant list."""
  bad = bad_records(paths)
  keys = [i * 2**32 + j for i, p in enumerate(paths) for j in bad[p]]
  table = tf.constant(keys or [-1], tf.int64)
  files_t = tf.constant(paths)

  def read(i):
    ds = tf.data.TFRecordDataset(files_t[i]).enumerate()
    if keys:
      ds = ds.filter(lambda j, _: ~tf.reduce_any(tf.equal(table, tf.cast(i, tf.int64) * 2**32 + j)))
    return ds.map(lambda _, record: record)

  return read


def count(paths):
  """Records per file, from counts.json beside the files where it lists them, else by reading."""
  out, missing = {}, []
  for p in paths:
    sidecar = os.path.join(os.path.dirname(p), COUNTS)
    known = _read_counts(sidecar)
    if os.path.basename(p) in known:
      out[p] = known[os.path.basename(p)]
    else:
      missing.append(p)
  if missing:
    logging.info('Counting the records of %d TFRecord files (write %s to skip this).',
                 len(missing), COUNTS)
    for p in missing:
      out[p] = int(tf.data.TFRecordDataset(p).reduce(tf.constant(0, tf.int64),
                                                     lambda n, _: n + 1))
  return out


_COUNT_CACHE = {}


def _read_counts(sidecar):
  if sidecar not in _COUNT_CACHE:
    _COUNT_CACHE[sidecar] = {}
    if tf.io.gfile.exists(sidecar):
      with tf.io.gfile.GFile(sidecar) as f:
        _COUNT_CACHE[sidecar] = json.load(f)
  return _COUNT_CACHE[sidecar]


class Reader:
  """``tf_source.Reader`` for TFRecords by glob."""

  def __init__(self, config):
    self.config = config
    self.num_classes = config.num_classes
    if not self.num_classes:
      raise ValueError('data.num_classes must be set for TFRecord data.')
    self.multi_label = config.multi_label
    self.classes = ()  # The schema carries label ids only.
    self.skipped = {}  # split -> records listed in bad_records.json.

  def _files(self, split):
    return files(self.config.data_dir, split)

  def size(self, split):
    paths = self._files(split)
    self.skipped[split] = sum(len(v) for v in bad_records(paths).values())
    return sum(usable(paths).values())

  def _train_files(self, split, process_index, process_count):
    mine = self._files(split)[process_index::process_count]
    if not mine:
      raise ValueError(f'{split} has fewer files than the {process_count} processes.')
    return mine

  def local_train_size(self, split, process_index, process_count):
    return sum(usable(self._train_files(split, process_index, process_count)).values())

  def epoch_fn(self, split, process_index, process_count, *, seed, shuffle_buffer):
    mine = self._train_files(split, process_index, process_count)
    read, cycle = _reader(mine), min(16, len(mine))

    def fn(epoch):
      order = tf.random.experimental.stateless_shuffle(
          tf.range(len(mine)), seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
      ds = tf.data.Dataset.from_tensor_slices(order).interleave(
          read, cycle_length=cycle, num_parallel_calls=cycle, deterministic=True)
      ds = ds.shuffle(shuffle_buffer, seed=epoch * 1_000_003 + seed,
                      reshuffle_each_iteration=False)
      return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    return fn

  def local_eval_sizes(self, split, process_count):
    n = self.size(split)
    return [len(range(p, n, process_count)) for p in range(process_count)]

  def ordered(self, split, process_index, process_count):
    paths = self._files(split)
    ds = tf.data.Dataset.range(len(paths)).flat_map(_reader(paths))
    ds = ds.shard(process_count, process_index)
    return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def prepare_label(self, labels):
    if not self.multi_label:
      return tf.cast(labels[0], tf.int32)
    hot = tf.one_hot(labels, self.num_classes, dtype=tf.float32)
    return tf.reduce_max(tf.concat([hot, tf.zeros([1, self.num_classes])], 0), 0)


def _find_bad(path):
  """Indices of the records of ``path`` whose image does not decode (one parallel pass)."""
  from coatnet_jax.data import transforms  # pylint: disable=g-import-not-at-top
  ds = tf.data.TFRecordDataset(path).enumerate()
  ds = ds.map(lambda j, r: (j, tf.shape(transforms.decode(parse(r)['image']))[0]),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
  good = {int(j) for j, _ in ds.as_numpy_iterator()}
  n = count([path])[path]
  return [j for j in range(n) if j not in good]


def write_counts(pattern, validate=True):
  """Writes counts.json (and, with ``validate``, bad_records.json) beside the matched files."""
  paths = sorted(tf.io.gfile.glob(pattern))
  _COUNT_CACHE.clear()
  by_dir = {}
  for p, n in count(paths).items():
    by_dir.setdefault(os.path.dirname(p), {})[os.path.basename(p)] = n
  for d, counts in by_dir.items():
    for name, new in ((COUNTS, counts), (BAD, None)):
      if new is None:
        if not validate:
          continue
        new = {b: _find_bad(os.path.join(d, b)) for b in counts}
        new = {b: v for b, v in new.items() if v}
      sidecar = os.path.join(d, name)
      merged = {**_read_counts(sidecar), **new}
      with tf.io.gfile.GFile(sidecar, 'w') as f:
        json.dump(merged, f, indent=1, sort_keys=True)
      logging.info('Wrote %s.', sidecar)
    print(f'{d}: {sum(counts.values())} records in {len(counts)} files')
  _COUNT_CACHE.clear()


def main(argv=None):
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description='Counts the records of JFT-style TFRecord files '
                                   'and lists the undecodable ones (counts.json, bad_records.json '
                                   'beside them).')
  parser.add_argument('--write_counts', required=True, metavar='GLOB',
                      help="the files, e.g. 'DIR/*.tfrecord' (quoted)")
  write_counts(parser.parse_args(argv).write_counts)


if __name__ == '__main__':
  main()
