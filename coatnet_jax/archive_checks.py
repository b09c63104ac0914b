"""What ``predict`` checks in an export archive before it trusts a byte of it.

An archive may come from anywhere, so: member sizes are checked from the zip directory before any
member is read (a 2.7 MB zip declaring a 1.5 GiB ``meta.json`` is refused unread); ``meta.json``
must be a JSON object whose fields have the types and ranges ``tools.export`` writes; the
serialized function and the variables must match the SHA-256 digests in ``meta.json`` (archives
from before the digests skip that check); the function's input and output shapes must agree with
``res`` and ``num_classes``. Every refusal is a one-line ``ArchiveError``. Class names are
printed through ``printable``, so control characters in them cannot rewrite the terminal.
"""

import hashlib
import math
import zipfile

from coatnet_jax import errors

MAX_META_BYTES = 4 * 2**20  # 21,841 class names take about 0.3 MiB.
MAX_COMPRESSION_RATIO = 100  # Float weights deflate by ~1.1x; a zip bomb by ~1000x.
MAX_CLASS_NAME_CHARS = 1000
MAX_RES = 8192
RESIZE_METHODS = ('bilinear', 'bicubic', 'area', 'lanczos3', 'lanczos5', 'gaussian',
                  'mitchellcubic', 'nearest')


class ArchiveError(errors.UserError):
  """An export archive that cannot be trusted; the message is one line."""


def check_members(z: zipfile.ZipFile, meta_name: str) -> None:
  """Declared sizes, before anything is decompressed."""
  for info in z.infolist():
    if (info.compress_type != zipfile.ZIP_STORED
        and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1024)):
      raise ArchiveError(f'member {info.filename!r} declares {info.file_size:,} bytes from '
                         f'{info.compress_size:,} compressed (a zip bomb?); refused unread.')
  try:
    meta = z.getinfo(meta_name)
  except KeyError:
    raise ArchiveError(f'no {meta_name} in the archive.') from None
  if meta.file_size > MAX_META_BYTES:
    raise ArchiveError(f'{meta_name} declares {meta.file_size:,} bytes, above the limit of '
                       f'{MAX_META_BYTES:,}; refused unread.')


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_meta(meta) -> None:
  """Types and ranges of the fields ``predict`` uses."""
  if not isinstance(meta, dict):
    raise ArchiveError(f'meta.json holds a {type(meta).__name__}, not an object.')
  res, n = meta.get('res'), meta.get('num_classes')
  if not isinstance(res, int) or isinstance(res, bool) or not 1 <= res <= MAX_RES:
    raise ArchiveError(f'meta.json "res" is {res!r}; an integer in [1, {MAX_RES}] is needed.')
  if not isinstance(n, int) or isinstance(n, bool) or n < 1:
    raise ArchiveError(f'meta.json "num_classes" is {n!r}; a positive integer is needed.')
  names = meta.get('class_names')
  if names is not None:
    if not isinstance(names, list) or len(names) != n:
      raise ArchiveError(f'meta.json "class_names" must be a list of {n} names (num_classes); it '
                         f'holds {len(names) if isinstance(names, list) else type(names).__name__}.')
    bad = [i for i, c in enumerate(names)
           if not isinstance(c, str) or len(c) > MAX_CLASS_NAME_CHARS]
    if bad:
      raise ArchiveError(f'meta.json class name {bad[0]} is not a string of at most '
                         f'{MAX_CLASS_NAME_CHARS} characters.')
  crop = meta.get('crop_fraction')
  if crop is not None and (not _number(crop) or crop <= 0):
    raise ArchiveError(f'meta.json "crop_fraction" is {crop!r}; a number > 0 or null is needed.')
  method = meta.get('eval_resize_method', 'bicubic')
  if method not in RESIZE_METHODS:
    raise ArchiveError(f'meta.json "eval_resize_method" is {method!r}; valid: '
                       f'{", ".join(RESIZE_METHODS)}.')
  if meta.get('output', 'softmax') not in ('softmax', 'sigmoid'):
    raise ArchiveError(f'meta.json "output" is {meta.get("output")!r}; softmax or sigmoid.')
  files = meta.get('files', {})
  if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
    raise ArchiveError('meta.json "files" must map names to archive member names.')
  digests = meta.get('sha256', {})
  if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
    raise ArchiveError('meta.json "sha256" must map names to hex digests.')


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def check_digest(meta: dict, key: str, data: bytes) -> None:
  want = meta.get('sha256', {}).get(key)
  if want is not None and sha256(data) != want:
    raise ArchiveError(f'the {key} member does not match its SHA-256 in meta.json (a damaged '
                       f'or altered archive); export it again.')


def check_signature(meta: dict, in_avals, out_avals) -> None:
  """The function takes (variables, (b, res, res, 3) uint8) and gives (b, num_classes)."""
  image = in_avals[-1]
  res, n = meta['res'], meta['num_classes']
  if tuple(image.shape[1:]) != (res, res, 3) or str(image.dtype) != 'uint8':
    raise ArchiveError(f'the exported function takes {image.dtype}{tuple(image.shape)} images; '
                       f'meta.json says uint8 ({res}, {res}, 3).')
  if len(out_avals) != 1 or out_avals[0].shape[-1] != n:
    raise ArchiveError(f'the exported function gives {[tuple(a.shape) for a in out_avals]}; '
                       f'meta.json says {n} classes.')


def printable(name: str) -> str:
  """``name`` with control and other non-printable characters escaped (\\x1b, \\n, ...)."""
  return ''.join(c if c.isprintable() else repr(c)[1:-1] for c in str(name))
