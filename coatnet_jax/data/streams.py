"""The deterministic train stream and the exact, padded evaluation pass, for every source.

Train: a process's examples form an endless stream, epoch after epoch. Epoch ``e`` is an order of
the process's examples that is a pure function of (seed, e) (the source's ``epoch_fn``); the
stream position of an example is ``e * n_local + i``. Every random augmentation of that example
is seeded by (seed, process, position) through stateless ops, and parallel maps are
deterministic. Step ``k`` therefore always holds positions [k B, (k + 1) B) with the same pixels,
so a run restarted at step ``k`` (``start_step``) sees bit for bit the batches that an
uninterrupted run sees: the checkpoint needs only the step it already carries. Resuming costs
reading, not decoding, the records before ``k B`` within the current epoch.

Eval: each process reads its part in a fixed order, then pads with masked blank examples to the
same number of batches on every process, so all examples count exactly once.
"""

import tensorflow as tf

from coatnet_jax.data import randaugment
from coatnet_jax.data import transforms

STREAM_END = 2**62


def example_seed(seed, process_index, position):
  """The [2] int64 seed of the example at ``position`` of this process's stream."""
  base = tf.constant([seed, process_index], tf.int64)
  return tf.random.experimental.stateless_fold_in(base, position)


def train_transform(image_bytes, seed, *, image_size, randaugment_layers=0,
                    randaugment_magnitude=0, resize_method='bilinear', crop_area=(0.08, 1.0),
                    crop_aspect=(3 / 4, 4 / 3), hflip=True, vflip=False, rot90=False):
  """Table 10 train view: Inception crop (area and aspect ranges), flips, 90-degree rotations,
  RandAugment(N, M); uint8 out. The optional ops draw seeds folded from ``seed`` apart from the
  three split ones, so the default view is the same with or without them."""
  crop_seed, flip_seed, ra_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  image = transforms.random_resized_crop(image_bytes, image_size, crop_seed, scale=crop_area,
                                         ratio=crop_aspect, method=resize_method,
                                         antialias=resize_method != 'bilinear')
  if hflip:
    image = transforms.random_flip(image, flip_seed)
  if vflip:
    image = tf.image.stateless_random_flip_up_down(
        image, tf.random.experimental.stateless_fold_in(seed, 3))
  if rot90:
    image = transforms.random_rot90(image, tf.random.experimental.stateless_fold_in(seed, 4))
  image = randaugment.randaugment(image, randaugment_layers, randaugment_magnitude, ra_seed)
  image.set_shape([image_size, image_size, 3])
  return image


def train_dataset(epoch_fn, n_local, local_batch, *, seed, process_index, start_step,
                  transform, prepare_label, ignore_errors=True):
  """Batches of ``transform(image_bytes, seed)`` from step ``start_step`` on.

  ``epoch_fn(epoch)`` maps an int64 scalar tensor to a dataset of {'image': bytes, 'label': ...}
  holding each of the process's ``n_local`` examples once, in an order fixed by (seed, epoch).
  With ``ignore_errors``, an example whose image does not decode is logged and its position is
  filled by the next decodable example (a duplicate): every position keeps its example wherever
  the bad ones are, so a restart still sees the uninterrupted run's batches.
  """
  if n_local < 1:
    raise ValueError('This process has no training examples.')
  start = start_step * local_batch
  first_epoch, offset = divmod(start, n_local)
  ds = tf.data.Dataset.range(first_epoch, STREAM_END).flat_map(epoch_fn)
  ds = ds.enumerate(start=first_epoch * n_local).skip(offset)

  @tf.autograph.experimental.do_not_convert  # Plain graph code; converting it costs seconds.
  def prepare(position, example):
    return position, {
        'image': transform(example['image'], example_seed(seed, process_index, position)),
        'label': prepare_label(example['label'])}

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if ignore_errors:
    ds = ds.ignore_errors(log_warning=True).scan(tf.constant(start - 1, tf.int64), _fill_gaps)
    ds = ds.unbatch()
  else:
    ds = ds.map(lambda position, example: example)
  return ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


@tf.autograph.experimental.do_not_convert
def _fill_gaps(last, element):
  """The example at ``position``, once for itself and once per dropped position since ``last``."""
  position, example = element
  copies = position - last
  return position, tf.nest.map_structure(
      lambda t: tf.broadcast_to(t[None], tf.concat([[copies], tf.shape(t, tf.int64)], 0)), example)


def eval_dataset(examples, local_sizes, local_batch, *, transform, prepare_label, image_size,
                 blank_label):
  """One pass over ``examples`` (this process's part), padded to the batches of the largest part
  with blank images labelled ``blank_label`` (zeros of the source's label spec) and mask 0."""
  batches = max(1, -(-max(local_sizes) // local_batch))

  @tf.autograph.experimental.do_not_convert
  def prepare(example):
    return {'image': transform(example['image']), 'label': prepare_label(example['label']),
            'mask': tf.constant(1, tf.int32)}

  ds = examples.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  # An undecodable image is dropped and logged; the trainer's count check then names the gap.
  ds = ds.ignore_errors(log_warning=True)
  pad = tf.data.Dataset.from_tensors({
      'image': tf.zeros((image_size, image_size, 3), tf.uint8), 'label': blank_label,
      'mask': tf.constant(0, tf.int32)}).repeat()
  return ds.concatenate(pad).take(batches * local_batch).batch(local_batch).prefetch(2)

