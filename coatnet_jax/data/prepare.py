r"""Prepares a TFDS dataset from its manually downloaded files, through TFDS's own builder.

  python -m coatnet_jax.data.prepare imagenet2012 --data_dir DATA_DIR [--manual_dir DIR]
  python -m coatnet_jax.data.prepare imagenet21k --data_dir DATA_DIR --manual_dir RELEASE_DIR

The same as ``tfds build NAME --data_dir DATA_DIR --manual_dir DIR``, without the ``tfds`` command
line: it imports Apache Beam (for its format-conversion commands) even when nothing needs it, and
Beam is not among this project's requirements. This calls the builder's own
``download_and_prepare`` (``imagenet2012`` is TFDS's builder, label files and image fixes
included; ``imagenet21k`` is ``coatnet_jax.data.imagenet21k``'s, registered on import).
``--manual_dir`` defaults to ``DATA_DIR/downloads/manual``, where TFDS looks for it.
"""

import argparse
import os

from coatnet_jax import errors

MANUAL_FILES = {'imagenet2012': ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')}


def prepare(name: str, data_dir: str, manual_dir: str = None):
  """Builds ``name`` into ``data_dir`` from ``manual_dir``; returns the builder."""
  # pylint: disable=g-import-not-at-top
  from coatnet_jax import cli
  cli.import_tensorflow()  # Without its C++ start-up banners.
  import tensorflow_datasets as tfds
  from coatnet_jax.data import DataNotFoundError
  if name == 'imagenet21k':
    from coatnet_jax.data import imagenet21k  # pylint: disable=unused-import  (registers it)
  # pylint: enable=g-import-not-at-top
  manual_dir = manual_dir or os.path.join(data_dir, 'downloads', 'manual')
  if not os.path.isdir(manual_dir):
    raise DataNotFoundError(f'No manual directory {manual_dir}; put the downloaded files there '
                            f'or pass --manual_dir.')
  missing = [f for f in MANUAL_FILES.get(name, ()) if not os.path.exists(
      os.path.join(manual_dir, f))]
  if missing:
    raise DataNotFoundError(f'{manual_dir} lacks {", ".join(missing)} (from image-net.org).')
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataNotFoundError(f'No TFDS dataset named {name!r}.') from e
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir))
  return builder


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('name', help='TFDS dataset name: imagenet2012, imagenet21k, ...')
  parser.add_argument('--data_dir', required=True, help='where the TFDS dataset is written')
  parser.add_argument('--manual_dir', default=None,
                      help='the downloaded files; default DATA_DIR/downloads/manual')
  args = parser.parse_args(argv)
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  with errors.exit_on_user_error():  # A missing dataset or manual file: one line, exit 1.
    builder = prepare(args.name, args.data_dir, args.manual_dir)
  splits = ', '.join(f'{k} {v.num_examples}' for k, v in sorted(builder.info.splits.items()))
  print(f'{args.name} prepared in {builder.data_dir}: {splits}')


if __name__ == '__main__':
  main()
