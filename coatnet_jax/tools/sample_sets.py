r"""Small real image sets that installed packages ship, written as class folders for transfer runs.

  python -m coatnet_jax.tools.sample_sets --out DIR [--sets faces,textures,photos]

writes DIR/<set>/<class>/<image>.png, the layout ``configs/transfer.py:data_dir=DIR/<set>`` reads
(split by the documented path hash). Nothing is downloaded and nothing is generated: every pixel
comes from a file inside the scikit-image (0.26) or scikit-learn wheel.

  faces     binary, object-like: scikit-image's ``lfw_subset``, 100 face and 100 non-face 25x25
            grayscale crops (Labeled Faces in the Wild).
  textures  3 classes, tile-like (GasHisSDB kind): the 512x512 grayscale brick, grass and gravel
            photographs, each cut into 64 non-overlapping 64x64 tiles (192 tiles).
  photos    binary, tile-like, colour: scikit-learn's two sample photographs (china, flower,
            427x640), each cut into 60 non-overlapping 64x64 tiles (120 tiles).

scikit-image is a development dependency (requirements-dev.txt); this tool names the install
command when it is missing.
"""

import os

from absl import flags
import numpy as np

from coatnet_jax import cli
from coatnet_jax import errors

SETS = ('faces', 'textures', 'photos')
TILE = 64


def _define_flags():
  """Defined only when run as a command: tests import this module beside other tools' flags."""
  flags.DEFINE_string('out', None, 'Folder to write DIR/<set>/<class>/<image>.png into.')
  flags.DEFINE_list('sets', list(SETS), f'Which sets: {", ".join(SETS)}.')


def _skimage_data():
  try:
    from skimage import data  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.UserError('the sample sets need scikit-image: pip install '
                           'scikit-image==0.26.0') from e
  return data


def _tiles(image, size=TILE):
  """Non-overlapping size x size tiles, row-major, of the top-left whole-tile region."""
  rows, cols = image.shape[0] // size, image.shape[1] // size
  return [image[r * size:(r + 1) * size, c * size:(c + 1) * size]
          for r in range(rows) for c in range(cols)]


def images(name):
  """{class name: [uint8 image (H, W) or (H, W, 3)]} of sample set ``name``."""
  if name == 'faces':
    crops = np.round(_skimage_data().lfw_subset() * 255).astype(np.uint8)  # First 100 are faces.
    return {'face': list(crops[:100]), 'non_face': list(crops[100:])}
  if name == 'textures':
    data = _skimage_data()
    return {c: _tiles(getattr(data, c)()) for c in ('brick', 'grass', 'gravel')}
  if name == 'photos':
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    sample = datasets.load_sample_images()
    return {os.path.splitext(os.path.basename(f))[0]: _tiles(im)
            for f, im in zip(sample.filenames, sample.images)}
  raise ValueError(f'unknown sample set {name!r}; valid: {", ".join(SETS)}')


def write(name, root):
  """Writes set ``name`` to root/<class>/<class>_NNN.png (skipped if already complete);
  returns {class: count}."""
  from PIL import Image  # pylint: disable=g-import-not-at-top (scikit-image's dependency)
  counts = {}
  for cls, ims in images(name).items():
    folder = os.path.join(root, cls)
    os.makedirs(folder, exist_ok=True)
    for i, im in enumerate(ims):
      path = os.path.join(folder, f'{cls}_{i:03d}.png')
      if not os.path.exists(path):
        tmp = path + '.tmp'
        Image.fromarray(im).save(tmp, format='PNG')
        os.replace(tmp, path)  # A crash never leaves a truncated PNG under the final name.
    counts[cls] = len(ims)
  return counts


def main(argv):
  del argv
  out, sets = flags.FLAGS.out, flags.FLAGS.sets
  if not out:
    raise errors.UserError('--out DIR is required: the folder to write the sample sets into.')
  unknown = [s for s in sets if s not in SETS]
  if unknown:
    raise errors.UserError(f'unknown --sets {",".join(unknown)}; valid: {", ".join(SETS)}.')
  for name in sets:
    counts = write(name, os.path.join(out, name))
    print(f'{os.path.join(out, name)}: ' + ', '.join(f'{c} {n}' for c, n in counts.items()))


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
