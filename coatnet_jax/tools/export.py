r"""Exports a checkpoint's inference function (``jax.export``) as one self-contained archive.

  python -m coatnet_jax.tools.export --workdir DIR --out model.zip [--res 384] [--step N]
      [--weights auto|ema|params] [--platforms cpu,cuda,tpu] [--dtype float32|bfloat16]

The exported function is ``fn(variables, images) -> probabilities``: ``images`` a uint8 RGB NHWC
batch of shape (b, res, res, 3), 0..255, with a polymorphic batch ``b``; the output float32 class
probabilities, softmax or sigmoid as the run's ``config.loss.kind``. The pixel normalisation
(``steps.normalize``) and the model's compute dtype are inside the function. The variables
are an argument, not constants: they are stored beside the function, fitted to ``res`` (the
relative-bias tables resized as ``evaluate --res`` does).

``--out`` is one zip archive:
  exported.bin        ``jax.export.Exported.serialize()``
  variables.msgpack   ``flax.serialization.msgpack_serialize`` of {'params'} (numpy), BatchNorm
                      folded into the convolutions (``models.fold_batchnorm``)
  meta.json           model, res, num_classes, class_names, output (softmax|sigmoid), the eval
                      protocol for ``predict`` (crop_fraction, eval_resize_method), source workdir,
                      step, weights, jax version, platforms, and the SHA-256 of the two other
                      members (``predict`` checks them: ``coatnet_jax.archive_checks``)

The function is lowered for every one of ``--platforms`` (default cpu,cuda,tpu; lowering needs no
such device, so one archive made on a CPU-only machine serves all three). ``python -m
coatnet_jax.predict --model model.zip IMAGE...`` applies it to image files; from code:
``jax.export.deserialize(exported_bytes).call(variables, images)``. The archive is written to a
temporary file beside ``--out`` and renamed, so ``--out`` is either complete or untouched.
"""

import json
import os
import tempfile
import zipfile

from coatnet_jax import cli  # pylint: disable=g-bad-import-order  (first: quiet start-up)
from absl import flags
from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np

from coatnet_jax import archive_checks
from coatnet_jax import errors
from coatnet_jax import input_pipeline
from coatnet_jax import models
from coatnet_jax import pretrained
from coatnet_jax import steps

EXPORTED = 'exported.bin'
VARIABLES = 'variables.msgpack'
META = 'meta.json'
FORMAT = 'coatnet_jax.export/1'
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')  # What jax.export lowers for.
DEFAULT_PLATFORMS = ('cpu', 'cuda', 'tpu')

_WORKDIR = flags.DEFINE_string('workdir', None, 'A run\'s workdir (or an import_timm --out).')
_OUT = flags.DEFINE_string('out', None, 'The archive to write (a .zip file).')
_RES = flags.DEFINE_integer('res', 0, 'Input resolution; 0: the run\'s own.')
_STEP = flags.DEFINE_integer('step', 0, 'Checkpoint step; 0: the newest complete one.')
_WEIGHTS = flags.DEFINE_enum('weights', 'auto', ['auto', 'ema', 'params'],
                             'auto: the EMA parameters when the run kept them.')
_DTYPE = flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'],
                           'Compute dtype of the exported function; default: the run\'s.')
_PLATFORMS = flags.DEFINE_list(
    'platforms', list(DEFAULT_PLATFORMS),
    f'Platforms to lower for, any of {",".join(PLATFORMS)}; no such device is needed to export.')
flags.mark_flags_as_required(['workdir', 'out'])


def _to_numpy(tree):
  """Plain nested dicts of numpy arrays (what msgpack stores and restores)."""
  if isinstance(tree, dict) or hasattr(tree, 'items'):
    return {str(k): _to_numpy(v) for k, v in tree.items()}
  return np.asarray(jax.device_get(tree))


def class_names(metadata: dict, num_classes: int) -> list:
  names = metadata.get('class_names')
  if not names:
    return [str(i) for i in range(num_classes)]
  if len(names) != num_classes:
    raise errors.UserError(f'The checkpoint names {len(names)} classes but has {num_classes}.')
  return [str(n) for n in names]


def inference_fn(config, model):
  """``fn(variables, uint8 images) -> float32 probabilities`` as the run's eval computes them."""
  kind = config.loss.kind
  if kind not in ('softmax', 'sigmoid'):
    raise errors.UserError(f'Unknown config.loss.kind {kind!r}: softmax or sigmoid.')
  dtype = steps.dtype_of(config.model.dtype)

  def fn(variables, images):
    logits = model.apply(variables, steps.normalize(images, dtype), train=False)
    logits = logits.astype(jnp.float32)
    return jax.nn.softmax(logits, axis=-1) if kind == 'softmax' else jax.nn.sigmoid(logits)

  return fn


def export(pre: pretrained.Pretrained, res: int = 0, platforms=DEFAULT_PLATFORMS, dtype=None):
  """(serialized export, numpy variables, meta) of ``pre`` at ``res`` (0: the run's own), computing
  in ``dtype`` ('float32' or 'bfloat16'; None: the run's)."""
  platforms = tuple(platforms)
  unknown = [p for p in platforms if p not in PLATFORMS]
  if unknown or not platforms:
    raise errors.UserError(f'Unknown platforms {unknown}; choose from {",".join(PLATFORMS)}.')
  config = pre.config
  res = int(res or config.data.image_size)
  config.data.image_size = res
  if dtype:
    config.model.dtype = dtype
  num_classes = pre.num_classes
  names = class_names(pre.metadata, num_classes)
  model = steps.build_model(config, num_classes)
  variables = pretrained.adapt(pre, model, res, num_classes)
  # The BatchNorm-folded network (models/fold.py): the same outputs with fewer passes.
  variables = _to_numpy(models.fold_batchnorm(model, variables))
  model = models.folded_model(model)
  fn = inference_fn(config, model)
  batch, = jax.export.symbolic_shape('b')
  specs = (jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables),
           jax.ShapeDtypeStruct((batch, res, res, 3), jnp.uint8))
  try:
    exported = jax.export.export(jax.jit(fn), platforms=platforms)(*specs)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.UserError(f'Lowering for {",".join(platforms)} failed: '
                           f'{errors.one_line(e)[:400]}') from e
  protocol = input_pipeline.eval_protocol(config.data)
  meta = {
      'format': FORMAT,
      'model': pre.metadata.get('model', config.model.name),
      'res': res,
      'num_classes': num_classes,
      'class_names': names,
      'output': config.loss.kind,
      'input': f'uint8 RGB NHWC (b, {res}, {res}, 3), 0..255',
      'dtype': config.model.dtype,
      # The eval transform the run applied (input_pipeline.eval_protocol); predict applies it.
      'crop_fraction': protocol['crop_fraction'],
      'eval_resize_method': protocol['resize_method'],
      'workdir': os.path.dirname(os.path.dirname(pre.path)),
      'step': int(pre.step),
      'weights': pre.weights,
      'jax_version': jax.__version__,
      'platforms': list(exported.platforms),
      'files': {'exported': EXPORTED, 'variables': VARIABLES},
  }
  serialized = bytes(exported.serialize())
  # Checked by predict (coatnet_jax.archive_checks): a damaged or altered member is one line.
  meta['sha256'] = {'exported': archive_checks.sha256(serialized),
                    'variables': archive_checks.sha256(
                        flax.serialization.msgpack_serialize(variables))}
  return serialized, variables, meta


def write_archive(out: str, exported: bytes, variables: dict, meta: dict) -> None:
  """Writes the archive to a temporary file beside ``out``, then renames it into place."""
  fd, tmp = _open_temp(out)
  try:
    with os.fdopen(fd, 'wb') as f, zipfile.ZipFile(f, 'w') as z:
      z.writestr(META, json.dumps(meta, indent=1) + '\n', zipfile.ZIP_DEFLATED)
      z.writestr(EXPORTED, exported, zipfile.ZIP_STORED)
      z.writestr(VARIABLES, flax.serialization.msgpack_serialize(variables), zipfile.ZIP_STORED)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the archive is an ordinary file.
    os.replace(tmp, out)
  except BaseException as e:
    _remove(tmp)
    if isinstance(e, OSError):
      raise errors.UserError(f'Cannot write {out}: {e.strerror or e}') from e
    raise


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _open_temp(out: str):
  if os.path.isdir(out):
    raise errors.UserError(f'--out {out} is a directory; name the archive file.')
  try:
    return tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(out)),
                            prefix=f'.{os.path.basename(out)}.', suffix='.tmp')
  except OSError as e:
    raise errors.UserError(f'Cannot write {out}: {e.strerror or e}') from e


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except OSError:
    pass


def check_writable(out: str) -> None:
  """Fails (one line) before any work when ``out`` cannot be written."""
  fd, tmp = _open_temp(out)
  os.close(fd)
  _remove(tmp)


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  out = _OUT.value
  check_writable(out)
  pre = pretrained.read(_WORKDIR.value, _STEP.value or None, _WEIGHTS.value != 'params')
  if _WEIGHTS.value == 'ema' and pre.weights != 'ema':
    raise pretrained.InitError(f'{pre.path} kept no EMA parameters; use --weights=params.')
  exported, variables, meta = export(pre, _RES.value, [p.strip() for p in _PLATFORMS.value],
                                     _DTYPE.value)
  write_archive(out, exported, variables, meta)
  logging.info('Exported %s (step %d, %s weights) at %d px for %s to %s.', pre.path, pre.step,
               pre.weights, meta['res'], ','.join(meta['platforms']), out)
  print(f'{out}: {meta["model"]} at {meta["res"]} px, {meta["num_classes"]} classes, step '
        f'{meta["step"]} ({meta["weights"]} weights), platforms {",".join(meta["platforms"])}, '
        f'{os.path.getsize(out) / 2**20:.1f} MiB')


if __name__ == '__main__':
  cli.run(main, user_errors=(OSError, ValueError))
