"""Helper for test_input_pipeline: the TFDS source on a real tiny on-disk dataset and on mock data.

Run in a subprocess (``python tests/tfds_run.py DATA_DIR``) so TensorFlow stays out of the other
tests' process. Prints TFDS_OK when every check passes.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # pylint: disable=g-import-not-at-top
import numpy as np
import tensorflow_datasets as tfds

from configs import common
from coatnet_jax import input_pipeline
from coatnet_jax.data import DataNotFoundError


class TinyJpegs(tfds.core.GeneratorBasedBuilder):
  """40 train / 13 validation JPEGs of varied sizes: real files, real slicing per process."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(encoding_format='jpeg'),
        'label': tfds.features.ClassLabel(num_classes=5)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(40, 0),
            'validation': self._generate_examples(13, 1000)}

  def _generate_examples(self, n, offset):
    rng = np.random.default_rng(offset)
    for i in range(n):
      h, w = rng.integers(20, 60, size=2)
      yield i, {'image': rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
                'label': (i + offset) % 5}


def main(data_dir):
  TinyJpegs(data_dir=data_dir).download_and_prepare()
  c = common.get_base_config().data
  c.update(dict(
      name='tiny_jpegs', data_dir=data_dir, train_split='train', eval_split='validation',
      image_size=32, crop_fraction=0.875, shuffle_buffer=16,
      randaugment={'num_layers': 2, 'magnitude': 15}))
  info = input_pipeline.get_info(c)
  assert (info.num_classes, info.train_size, info.eval_size) == (5, 40, 13), info
  want = sorted((i + 1000) % 5 for i in range(13))
  for processes in (1, 2, 3):
    b = next(input_pipeline.train_iterator(c, 6 * processes, seed=0, process_count=processes))
    assert b['image'].shape == (6, 32, 32, 3) and b['image'].dtype == np.uint8, b['image'].shape
    assert b['label'].shape == (6,) and b['label'].max() < 5
    for global_batch in (processes, 4 * processes, 16 * processes):
      labels, num_batches = [], set()
      for p in range(processes):
        batches = list(input_pipeline.eval_iterator(c, global_batch, process_index=p,
                                                    process_count=processes))
        num_batches.add(len(batches))
        for x in batches:
          assert x['image'].shape == (global_batch // processes, 32, 32, 3), x['image'].shape
          labels += x['label'][x['mask'] == 1].tolist()
      assert len(num_batches) == 1, num_batches  # The same number of batches on every process.
      assert sorted(labels) == want, (processes, global_batch, labels)

  # Resume: a restart at step k sees bit for bit the batches of an uninterrupted run (the stream
  # crosses epochs: 20 examples per process, batch 4 each), on each of 2 processes; another seed
  # differs.
  import hashlib  # pylint: disable=g-import-not-at-top
  digest = lambda bs: hashlib.sha256(b''.join(
      x[k].tobytes() for x in bs for k in sorted(x))).hexdigest()
  for processes in (2,):
    its = [input_pipeline.train_iterator(c, 8, seed=5, process_index=p, process_count=processes)
           for p in range(processes)]
    full = [[next(it) for _ in range(12)] for it in its]
    for p in range(processes):
      again = input_pipeline.train_iterator(c, 8, seed=5, process_index=p,
                                            process_count=processes, start_step=7)
      assert digest([next(again) for _ in range(5)]) == digest(full[p][7:]), (processes, p)
  other = next(input_pipeline.train_iterator(c, 8, seed=6))
  assert digest([other]) != digest(full[0][:1])
  # Fine-tuning eval: the whole image resized, no crop.
  c.crop_fraction = None
  b = next(input_pipeline.eval_iterator(c, 4))
  assert b['image'].shape == (4, 32, 32, 3)
  c.crop_fraction = 0.875

  # Stored as array_record: one line that names the rebuild, not a failure in the reader.
  array_dir = os.path.join(data_dir, 'array_record')
  TinyJpegs(data_dir=array_dir, file_format='array_record').download_and_prepare()
  try:
    input_pipeline.get_info(ml_collections.ConfigDict(dict(c, data_dir=array_dir)))
    raise AssertionError('array_record data was accepted')
  except DataNotFoundError as e:
    assert '\n' not in str(e) and '--file_format=tfrecord' in str(e) and 'array_record' in str(e), e

  # The decode path on TFDS's mocked ImageNet (random JPEGs with the real feature spec).
  c.name, c.data_dir = 'imagenet2012', None
  with tfds.testing.mock_data(num_examples=8):
    b = next(input_pipeline.train_iterator(c, 4, seed=0))
    assert b['image'].shape == (4, 32, 32, 3) and b['image'].dtype == np.uint8
    assert b['label'].max() < 1000
  print('TFDS_OK')


if __name__ == '__main__':
  main(sys.argv[1])
