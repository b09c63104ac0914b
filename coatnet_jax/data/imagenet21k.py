r"""TFDS builder for the ImageNet-21K release (fall11: 21,841 classes; winter21: 19,167).

Prepare (once; reads the release, decodes every image once, writes TFRecord shards):

  python -m coatnet_jax.data.imagenet21k --manual_dir RELEASE_DIR --data_dir DATA_DIR

RELEASE_DIR holds the release as downloaded from image-net.org, in either layout:
  * one outer archive, e.g. ``winter21_whole.tar.gz`` or ``fall11_whole.tar``, whose members are
    per-synset archives ``nXXXXXXXX.tar`` (possibly under a folder inside it); an uncompressed
    outer .tar is listed by seeking, a .tar.gz needs one extra decompression pass to list it; or
  * a directory (searched two levels deep) of the per-synset archives ``nXXXXXXXX.tar``, e.g.
    after ``tar xf winter21_whole.tar.gz -C RELEASE_DIR``.
Classes are the sorted synset ids found; the count and the release it matches are recorded in
the dataset's metadata (``metadata.json``: release, num_classes, images, skipped, converted,
refused_members) and logged.

Held-out split (21K has no validation set): an image is in ``validation`` iff
``int(sha256(file name).hexdigest()[:8], 16) % 1000 < 8`` (file name without directories, e.g.
``n01440764_10026.JPEG``), ~0.8% of the images (about 105K for winter21), else in ``train``. The
rule depends on the file name only: the same images are held out on any machine, in any layout,
in any order, and in both releases for the images they share.

Safety: archives are read as streams and nothing is ever extracted to disk, so nothing can be
written outside the target; members with absolute paths, ``..`` components, links or devices are
refused (skipped, logged, counted once in ``refused_members``). A member is read only when its
declared size is within ``image_limits.MAX_FILE_BYTES`` (64 MiB; a sparse member declaring 2 GiB
is refused unread) and decoded only when its header is within ``image_limits.MAX_PIXELS``; both
are skipped and named in ``too_large``. A per-synset tar that is not a regular file (a FIFO), is
empty, corrupt or truncated is named in ``bad_archives`` with the reason and the build goes on
(the images read before a truncation are kept); in the per-synset layout such a tar, and one with
no image member, is not a class. Synsets that end with no image are named in ``empty_synsets``.

Images: every image is decoded once (JPEGs at 1/8 scale via PIL's draft mode, enough to find
truncation). RGB and grey JPEGs are stored as they are; CMYK JPEGs, PNG/GIF bytes under a .JPEG
name and other modes are converted to RGB JPEG (quality 95); images that do not decode are
skipped. Both counts are in the metadata and the log.
"""

import argparse
import glob
import hashlib
import io
import os
import posixpath
import stat
import tarfile
import zlib

from absl import logging
from PIL import Image
import tensorflow_datasets as tfds

from coatnet_jax import errors
from coatnet_jax.data import DataNotFoundError
from coatnet_jax.data import image_limits

RELEASES = {21841: 'fall11', 19167: 'winter21'}
HELD_OUT_PER_MILLE = 8
PREPARE = 'python -m coatnet_jax.data.imagenet21k --manual_dir RELEASE_DIR --data_dir DATA_DIR'
# What a damaged archive raises while it is read.
ARCHIVE_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


def held_out(file_name: str, per_mille: int = HELD_OUT_PER_MILLE) -> bool:
  """The documented held-out rule (module docstring)."""
  base = posixpath.basename(file_name)
  return int(hashlib.sha256(base.encode()).hexdigest()[:8], 16) % 1000 < per_mille


def safe_member(member: tarfile.TarInfo) -> bool:
  """A regular file with a relative name that stays inside the archive's root."""
  name = member.name
  if not member.isfile() or name.startswith(('/', '\\')) or os.path.isabs(name):
    return False
  if len(name) > 1 and name[1] == ':':  # A Windows drive letter.
    return False
  return '..' not in name.replace('\\', '/').split('/')


def _synset(name: str):
  base = posixpath.basename(name)
  stem = base[:-4] if base.endswith('.tar') else None
  if stem and stem.startswith('n') and stem[1:].isdigit():
    return stem
  return None


class Release:
  """The manual directory, in either layout; yields (synset, file name, bytes) as a stream of the
  members within ``max_file_bytes``."""

  def __init__(self, manual_dir, max_file_bytes=image_limits.MAX_FILE_BYTES):
    self.manual_dir = manual_dir
    self.max_file_bytes = max_file_bytes
    self.refused = []  # Each refused member once, however many passes read it.
    self.bad_archives = {}  # path -> why (not a regular file, empty, corrupt, truncated).
    self.too_large = []  # 'synset/name: why' of members above image_limits.
    if not manual_dir or not os.path.isdir(manual_dir):
      raise DataNotFoundError(f'No ImageNet-21K release directory {manual_dir}; put the release '
                              f'there and run: {PREPARE}')
    self.synset_tars = {}
    for depth in ('*', '*/*', '*/*/*'):
      for path in glob.glob(os.path.join(glob.escape(manual_dir), depth + '.tar')):
        if _synset(path) and self._readable(path):
          self.synset_tars[_synset(path)] = path
    counts = {s: self._scan(p) for s, p in self.synset_tars.items()}
    self.empty_synsets = []  # Readable archives without an image member: not classes.
    for s in sorted(s for s, n in counts.items() if not n):
      path = self.synset_tars.pop(s)
      if path not in self.bad_archives:
        logging.warning('Synset archive %s holds no image member; it is not a class.', path)
        self.empty_synsets.append(s)
    self.outer = None
    if not self.synset_tars:
      outers = sorted(f for f in os.listdir(manual_dir)
                      if f.endswith(('.tar', '.tar.gz', '.tgz')) and not _synset(f)
                      and self._readable(os.path.join(manual_dir, f)))
      if not outers:
        raise DataNotFoundError(f'{manual_dir} holds neither nXXXXXXXX.tar files nor an outer '
                                f'archive (e.g. winter21_whole.tar.gz); then run: {PREPARE}')
      self.outer = os.path.join(manual_dir, outers[0])
      try:
        with tarfile.open(self.outer, 'r:*') as t:
          names = [m.name for m in t.getmembers() if self._accept(m, self.outer)]
      except ARCHIVE_ERRORS as e:
        raise DataNotFoundError(f'The release archive {self.outer} cannot be read ({type(e).__name__}: '
                                f'{e}); download it again, then run: {PREPARE}') from e
      self.synsets = sorted({_synset(n) for n in names if _synset(n)})
    else:
      self.synsets = sorted(self.synset_tars)
    if not self.synsets:
      raise DataNotFoundError(f'No nXXXXXXXX.tar synset archives found in {manual_dir}; run: '
                              f'{PREPARE}')

  def _readable(self, path):
    """A regular file (a FIFO or device named like an archive would hang or never end)."""
    if stat.S_ISREG(os.stat(path).st_mode):
      return True
    self._bad(path, 'not a regular file')
    return False

  def _bad(self, where, why):
    why = errors.one_line(why)
    if where not in self.bad_archives:
      logging.warning('Skipping archive %s: %s.', where, why)
      self.bad_archives[where] = why

  def _scan(self, path):
    """Image members of a per-synset tar, from its headers (seeks, reads no image), or 0 when it
    is empty or corrupt (then named in bad_archives)."""
    count = 0
    try:
      with tarfile.open(path, 'r:*') as t:
        for m in t:
          count += safe_member(m)
    except ARCHIVE_ERRORS as e:  # Truncated after ``count`` members: those are still read.
      self._bad(path, f'{type(e).__name__}: {e}')
    return count

  def _accept(self, member, where):
    if safe_member(member):
      return True
    if member.isdir():
      return False
    entry = f'{where}:{member.name}'
    if entry not in self.refused:
      logging.warning('Refusing archive member %r of %s (absolute path, "..", link or device).',
                      member.name, where)
      self.refused.append(entry)
    return False

  def _inner(self, synset, fileobj, where):
    """The synset's images; a damaged archive ends its synset (named), never the build."""
    try:
      with tarfile.open(fileobj=fileobj, mode='r|*') as inner:
        for m in inner:
          if not self._accept(m, where):
            continue
          name = posixpath.basename(m.name)
          # Declared: nothing read yet.
          too_large = image_limits.too_many_bytes(m.size, self.max_file_bytes)
          if too_large:
            if f'{synset}/{name}' not in self.too_large:
              logging.warning('Skipping %s/%s: %s.', synset, name, too_large)
              self.too_large.append(f'{synset}/{name}')
            continue
          yield synset, name, inner.extractfile(m).read()
    except ARCHIVE_ERRORS as e:
      self._bad(where, f'{type(e).__name__}: {e}')

  def images(self):
    if self.outer is None:
      for s in self.synsets:
        with open(self.synset_tars[s], 'rb') as f:
          yield from self._inner(s, f, self.synset_tars[s])
      return
    with tarfile.open(self.outer, 'r|*') as outer:
      for m in outer:
        if not self._accept(m, self.outer) or not _synset(m.name):
          continue
        yield from self._inner(_synset(m.name), outer.extractfile(m), f'{self.outer}:{m.name}')


def sanitize(data: bytes):
  """(JPEG bytes, converted?) for an image that decodes, else None (see module docstring)."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      if img.format == 'JPEG' and img.mode in ('RGB', 'L'):
        img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
        img.load()
        return data, False
      img.load()
      rgb = img.convert('RGB')
  except Exception:  # pylint: disable=broad-except
    return None
  out = io.BytesIO()
  rgb.save(out, 'JPEG', quality=95)
  return out.getvalue(), True


class Imagenet21k(tfds.core.GeneratorBasedBuilder):
  """ImageNet-21K (fall11 or winter21) from the official release; see the module docstring."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First version: hash held-out split, sanitised images.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Download the ImageNet-21K release (winter21_whole.tar.gz or fall11_whole.tar) from '
      'https://image-net.org, put it (or its per-synset nXXXXXXXX.tar files) in the manual '
      f'directory and run: {PREPARE}')
  held_out_per_mille = HELD_OUT_PER_MILLE
  max_file_bytes = image_limits.MAX_FILE_BYTES

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(),
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://image-net.org',
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    release = Release(dl_manager.manual_dir, self.max_file_bytes)
    self.info.features['label'].names = release.synsets
    n = len(release.synsets)
    self.info.metadata.update({
        'release': RELEASES.get(n, f'unknown ({n} classes)'), 'num_classes': n,
        'held_out_rule': f'sha256(file name)[:8] % 1000 < {self.held_out_per_mille}',
        'images': {}, 'skipped': [], 'converted': 0, 'refused_members': release.refused,
        'too_large': release.too_large, 'bad_archives': release.bad_archives,
        'empty_synsets': list(release.empty_synsets)})
    self._kept = {s: 0 for s in release.synsets}
    logging.info('ImageNet-21K release in %s: %d classes (%s), %s layout.', dl_manager.manual_dir,
                 n, self.info.metadata['release'], 'outer archive' if release.outer else
                 'per-synset archives')
    return {'train': self._generate_examples(release, False),
            'validation': self._generate_examples(release, True)}

  def _generate_examples(self, release, validation):
    meta = self.info.metadata
    split = 'validation' if validation else 'train'
    meta['images'][split] = 0
    for synset, name, data in release.images():
      if held_out(name, self.held_out_per_mille) != validation:
        continue
      too_large = image_limits.too_large(data)  # From the header, before decoding.
      if too_large:
        if f'{synset}/{name}' not in meta['too_large']:
          meta['too_large'].append(f'{synset}/{name}')
          logging.warning('Skipping %s/%s: %s.', synset, name, too_large)
        continue
      clean = sanitize(data)
      if clean is None:
        if f'{synset}/{name}' not in meta['skipped']:
          meta['skipped'].append(f'{synset}/{name}')
          logging.warning('Skipping %s/%s: it does not decode as an image.', synset, name)
        continue
      data, converted = clean
      meta['converted'] += int(converted)
      meta['images'][split] += 1
      self._kept[synset] += 1
      yield f'{synset}/{name}', {'image': data, 'label': synset, 'file_name': name}
    logging.info('%s: %d images, %d skipped so far, %d converted so far, %d members refused, %d '
                 'too large, %d bad archives.', split, meta['images'][split],
                 len(meta['skipped']), meta['converted'], len(release.refused),
                 len(meta['too_large']), len(release.bad_archives))
    if len(meta['images']) == 2:  # Both splits read: a synset with no image in either is named.
      empty = sorted(set(release.empty_synsets) | {s for s, n in self._kept.items() if not n})
      for s in sorted(set(empty) - set(meta['empty_synsets'])):
        logging.warning('Synset %s has no image in the built dataset.', s)
      meta['empty_synsets'] = empty


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--manual_dir', required=True, help='the release (either layout)')
  parser.add_argument('--data_dir', required=True, help='where the TFDS dataset is written')
  args = parser.parse_args()
  logging.set_verbosity(logging.INFO)
  builder = Imagenet21k(data_dir=args.data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=args.manual_dir))
  print(builder.info.metadata)


if __name__ == '__main__':
  main()
