"""Any TFDS dataset with 'image' and 'label' features, read through its file instructions.

Reading the TFRecord shards ourselves (rather than ``builder.as_dataset``) lets the epoch number be a
tensor inside the stream: epoch ``e`` visits the process's shard pieces in an order drawn from
(seed, e), interleaves them deterministically and shuffles with a buffer seeded by (seed, e).
The per-process part is ``tfds.split_for_jax_process``. Builders whose files are not on disk
(``tfds.testing.mock_data``) fall back to ``as_dataset`` in a fixed file order, shuffled by the
same seeded buffer: still deterministic, only less well mixed.
"""

import os

from absl import logging
import tensorflow as tf
import tensorflow_datasets as tfds

from coatnet_jax.data import DataNotFoundError

PREPARE = {
    'imagenet2012': 'put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in '
                    'DATA_DIR/downloads/manual and run: python -m coatnet_jax.data.prepare '
                    'imagenet2012 --data_dir DATA_DIR',
    'imagenet21k': 'python -m coatnet_jax.data.imagenet21k --manual_dir RELEASE_DIR '
                   '--data_dir DATA_DIR',
}


def builder(config):
  name, data_dir = config.name, config.data_dir
  if config.name == 'imagenet21k':
    from coatnet_jax.data import imagenet21k  # pylint: disable=g-import-not-at-top,unused-import
  try:
    b = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataNotFoundError(f'No TFDS dataset named {name!r} ({e.__class__.__name__}).') from e
  if _is_mocked():
    return b
  how = PREPARE.get(name, f'python -m coatnet_jax.data.prepare {name} --data_dir DATA_DIR')
  how = how.replace('DATA_DIR', data_dir or tfds.core.constants.DATA_DIR)
  if not tf.io.gfile.exists(os.path.join(b.data_dir, 'dataset_info.json')):
    raise DataNotFoundError(f'Dataset {name!r} is not prepared in {b.data_dir}; prepare it '
                            f'with: {how}')
  file_format = b.info.file_format or tfds.core.FileFormat.TFRECORD
  if file_format != tfds.core.FileFormat.TFRECORD:
    # The stream reads the TFRecord shards itself (epoch order as a tensor, bit-exact resume).
    raise DataNotFoundError(f'Dataset {name!r} in {b.data_dir} is stored as {file_format.value}; '
                            f'this trainer reads TFRecord shards, so rebuild it with: {how} '
                            f'--file_format=tfrecord')
  return b


def _is_mocked():
  """True inside ``tfds.testing.mock_data`` (no files on disk, as_dataset patched)."""
  return getattr(tfds.core.DatasetBuilder.as_dataset, '__name__', '').startswith('mock')


def process_split(split, process_index, process_count):
  return tfds.split_for_jax_process(split, process_index=process_index,
                                    process_count=process_count)


def num_examples(b, split):
  if _is_mocked():  # Mocked split sizes are not known in advance: count the mock examples.
    return int(b.as_dataset(split=split).reduce(0, lambda n, _: n + 1))
  return b.info.splits[split].num_examples


def _decoders():
  return {'image': tfds.decode.SkipDecoding()}


def _instructions(b, split):
  try:
    instructions = b.info.splits[split].file_instructions
  except Exception:  # pylint: disable=broad-except
    return None
  if not instructions or not tf.io.gfile.exists(os.fspath(instructions[0].filename)):
    return None
  return instructions


def epoch_fn(b, split, *, seed, shuffle_buffer, cycle_length=16):
  """epoch (int64 tensor) -> the split's examples in an order fixed by (seed, epoch)."""
  instructions = _instructions(b, split)
  features = b.info.features
  if instructions is None:
    logging.warning('%s: files not found (mocked?); reading %s with as_dataset in a fixed file '
                    'order.', b.name, split)

    def from_builder(epoch):
      ds = b.as_dataset(split=split, shuffle_files=False, decoders=_decoders())
      return ds.shuffle(shuffle_buffer, seed=epoch * 1_000_003 + seed,
                        reshuffle_each_iteration=False)

    return from_builder
  files = tf.constant([os.fspath(i.filename) for i in instructions])
  skips = tf.constant([i.skip for i in instructions], tf.int64)
  takes = tf.constant([i.take for i in instructions], tf.int64)

  def read(i):
    return tf.data.TFRecordDataset(files[i]).skip(skips[i]).take(takes[i])

  def parse(record):
    return features.deserialize_example(record, decoders=_decoders())

  def fn(epoch):
    key = tf.stack([tf.constant(seed, tf.int64), epoch])
    order = tf.random.experimental.stateless_shuffle(tf.range(len(instructions)), seed=key)
    ds = tf.data.Dataset.from_tensor_slices(order).interleave(
        read, cycle_length=min(cycle_length, len(instructions)), deterministic=True,
        num_parallel_calls=min(cycle_length, len(instructions)))
    ds = ds.shuffle(shuffle_buffer, seed=epoch * 1_000_003 + seed, reshuffle_each_iteration=False)
    return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  return fn


def ordered(b, split):
  return b.as_dataset(split=split, shuffle_files=False, decoders=_decoders())


class Reader:
  """``tf_source.Reader`` for a TFDS dataset."""

  def __init__(self, config):
    self.config = config
    self.builder = builder(config)
    label = self.builder.info.features['label']
    self.num_classes = config.num_classes or label.num_classes
    self.classes = ()  # Unnamed: ImageNet's TFDS names are synset ids, no use to per-class metrics.
    self.skipped = {}  # TFDS builders leave undecodable images out when they prepare the data.

  def size(self, split):
    return num_examples(self.builder, split)

  def local_train_size(self, split, process_index, process_count):
    return num_examples(self.builder, process_split(split, process_index, process_count))

  def epoch_fn(self, split, process_index, process_count, *, seed, shuffle_buffer):
    return epoch_fn(self.builder, process_split(split, process_index, process_count), seed=seed,
                    shuffle_buffer=shuffle_buffer)

  def local_eval_sizes(self, split, process_count):
    return [num_examples(self.builder, process_split(split, p, process_count))
            for p in range(process_count)]

  def ordered(self, split, process_index, process_count):
    return ordered(self.builder, process_split(split, process_index, process_count))

  def prepare_label(self, label):
    return tf.cast(label, tf.int32)
