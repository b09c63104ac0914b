r"""Classifies image files with an archive from ``tools.export``; no checkpoint or config needed.

  python -m coatnet_jax.predict --model model.zip IMAGE [IMAGE ...] [--json] [--top 5]

Every image (JPEG, PNG, GIF or BMP, whatever its name says) is decoded and transformed exactly as
the run's evaluation does (``data.transforms.eval_image`` with the archive's resolution, crop
fraction and resize method), the images are batched (``--batch_size``) and given to the exported
function. For each image prints its path, then the ``--top`` classes as ``  1. NAME  0.9731``
lines; with ``--json``, one JSON object per image instead:
``{"path": ..., "top": [{"rank": 1, "index": 3, "class": "dog", "probability": 0.9731}, ...]}``.
Probabilities are softmax or sigmoid as the run's loss (the archive's meta ``output``).

An unreadable file or one that is no image ends the run with one ``error:`` line naming it (exit
status 1) before anything is printed.
"""

import json
import os
import re
import zipfile

from coatnet_jax import cli  # pylint: disable=g-bad-import-order  (first: quiet start-up)
from absl import flags
import flax
import jax
import numpy as np

from coatnet_jax import archive_checks
from coatnet_jax import errors

# The export's archive members (kept equal to coatnet_jax.tools.export's; not imported from there
# so that this module needs no model code).
EXPORTED = 'exported.bin'
VARIABLES = 'variables.msgpack'
META = 'meta.json'

_MODEL = flags.DEFINE_string('model', None, 'An archive written by coatnet_jax.tools.export.')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object per image.')
_TOP = flags.DEFINE_integer('top', 5, 'Classes to print per image (at most the class count).')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Images per call of the exported function.')
flags.mark_flags_as_required(['model'])


class PredictError(errors.UserError):
  """A model archive or image that cannot be used; the message is one line."""


def load(path: str):
  """(meta, exported, variables) of an archive written by ``tools.export``, checked first
  (``archive_checks``: sizes, meta.json fields, digests, the function's shapes)."""
  try:
    with zipfile.ZipFile(path) as z:
      archive_checks.check_members(z, META)
      meta = json.loads(z.read(META))
      archive_checks.check_meta(meta)
      exported = z.read(meta.get('files', {}).get('exported', EXPORTED))
      variables = z.read(meta.get('files', {}).get('variables', VARIABLES))
    archive_checks.check_digest(meta, 'exported', exported)
    archive_checks.check_digest(meta, 'variables', variables)
  except (archive_checks.ArchiveError, OSError, zipfile.BadZipFile, KeyError, ValueError,
          RuntimeError) as e:
    why = e.strerror if isinstance(e, OSError) and e.strerror else errors.one_line(e, limit=300)
    raise PredictError(f'{path} is not a readable coatnet_jax.tools.export archive: {why}') from e
  try:
    exported = jax.export.deserialize(bytearray(exported))
    variables = flax.serialization.msgpack_restore(variables)
  except Exception as e:  # pylint: disable=broad-except
    raise PredictError(f'{path}: cannot deserialize the exported model (made with jax '
                       f'{meta.get("jax_version")}; this is jax {jax.__version__}): '
                       f'{errors.one_line(e, limit=300)}') from e
  try:
    archive_checks.check_signature(meta, exported.in_avals, exported.out_avals)
  except archive_checks.ArchiveError as e:
    raise PredictError(f'{path}: {e}') from e
  return meta, exported, variables


def _tf():
  tf = cli.import_tensorflow()  # Without its C++ start-up banners.
  tf.config.set_visible_devices([], 'GPU')  # Keep TF off the accelerators JAX owns.
  return tf


def make_transform(meta: dict):
  """path -> uint8 (res, res, 3): the file through the run's eval transform (TF, eager)."""
  tf = _tf()
  from coatnet_jax.data import image_limits  # pylint: disable=g-import-not-at-top
  from coatnet_jax.data import transforms  # pylint: disable=g-import-not-at-top
  res, crop = int(meta['res']), meta.get('crop_fraction')
  method = meta.get('eval_resize_method', 'bicubic')

  def run(path: str) -> np.ndarray:
    try:
      with open(path, 'rb') as f:
        # The training rule (data.image_limits), from the declared size and the header.
        too_large = (image_limits.too_many_bytes(os.fstat(f.fileno()).st_size)
                     or image_limits.too_large(f))
        f.seek(0)
        data = None if too_large else f.read()
    except OSError as e:
      raise PredictError(f'Cannot read {path}: {e.strerror or e}') from e
    if too_large:
      raise PredictError(f'{path} is too large an image: {too_large}.')
    try:
      return transforms.eval_image(tf.constant(data), res, crop, method).numpy()
    except (tf.errors.OpError, ValueError) as e:
      raise PredictError(f'{path} is not a decodable image: {_tf_message(e)}') from e

  return run


def _tf_message(e: BaseException) -> str:
  """TF's reason without its node and op decorations."""
  text = errors.one_line(getattr(e, 'message', None) or e, limit=300)
  return errors.one_line(re.sub(r'\{\{[^}]*\}\}|\[Op:[^\]]*\].*$', '', text))


def predict(exported, variables, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
  """Probabilities (n, num_classes) for uint8 ``images`` (n, res, res, 3).

  Calls of ``batch_size`` images (the last one padded), or one call of all when fewer, so a run
  compiles the function once.
  """
  variables = jax.device_put(variables)
  n = len(images)
  if n <= batch_size:
    return np.asarray(exported.call(variables, images))
  out = []
  for start in range(0, n, batch_size):
    chunk = images[start:start + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    out.append(np.asarray(exported.call(variables, chunk))[:batch_size - pad])
  return np.concatenate(out)


def top_classes(probs: np.ndarray, names, k: int) -> list:
  order = np.argsort(-probs, kind='stable')[:min(k, len(probs))]
  return [{'rank': r + 1, 'index': int(i), 'class': names[i], 'probability': float(probs[i])}
          for r, i in enumerate(order)]


def main(argv):
  paths = argv[1:]
  if not paths:
    raise errors.UserError('Give one or more image files.')
  if _TOP.value < 1 or _BATCH.value < 1:
    raise errors.UserError('--top and --batch_size must be positive.')
  meta, exported, variables = load(_MODEL.value)
  platform = jax.default_backend()
  accepted = {'gpu': ('cuda', 'rocm')}.get(platform, (platform,))
  if not set(accepted) & set(exported.platforms):
    raise PredictError(f'{_MODEL.value} was exported for {",".join(exported.platforms)}; this '
                       f'machine runs {platform}: export again with --platforms.')
  transform = make_transform(meta)
  images = np.stack([transform(p) for p in paths])
  probs = predict(exported, variables, images, _BATCH.value)
  names = meta.get('class_names') or [str(i) for i in range(probs.shape[-1])]
  for path, p in zip(paths, probs):
    top = top_classes(p, names, _TOP.value)
    if _JSON.value:
      print(json.dumps({'path': path, 'top': top}))
    else:
      print(archive_checks.printable(path))
      for t in top:
        print(f'  {t["rank"]}. {archive_checks.printable(t["class"])}  {t["probability"]:.4f}')


if __name__ == '__main__':
  cli.run(main, user_errors=(ValueError,))
