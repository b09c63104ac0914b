r"""Imports a timm ``coatnet_N_224`` checkpoint as a model-only checkpoint of this project.

  python -m coatnet_jax.tools.import_timm --model coatnet_0_224 --weights FILE.safetensors --out DIR

DIR then serves as ``configs/finetune.py:init=DIR,timm,variant=coatnet_0``, and works with
``evaluate``, ``tools.export`` and ``predict``. The weights go through ``convert.from_timm``, whose
numbers tests/test_timm_parity.py checks against timm itself; the config saved with them has timm's
architecture switches (``models.TIMM_OPTIONS``) so that a fine-tune builds the same function.
``.safetensors`` files need only the ``safetensors`` package; ``.pth``/``.bin`` files need torch.
timm's ``coatnet_5_224`` uses 32 channels per head where the paper's (and this project's) uses 64,
so it is refused rather than imported into a model it does not match.
"""

import dataclasses
import os
import sys

from coatnet_jax import cli  # pylint: disable=g-bad-import-order  (first: quiet start-up)
from absl import flags
from absl import logging
import numpy as np

from coatnet_jax import checkpointing
from coatnet_jax import convert
from coatnet_jax import models

_MODEL = flags.DEFINE_string('model', None, 'timm model name, e.g. coatnet_0_224.')
_WEIGHTS = flags.DEFINE_string('weights', None, 'A .safetensors (or .pth/.bin) state dict.')
_OUT = flags.DEFINE_string('out', None, 'A new directory for the checkpoint.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                           'Compute dtype saved with the weights (what evaluate, export and a '
                           'fine-tune use unless told otherwise); parameters stay float32.')
flags.mark_flags_as_required(['model', 'weights', 'out'])


def load_state_dict(path: str) -> dict:
  """timm parameter name -> numpy array, from a safetensors or torch file."""
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return load_file(path)
  import torch  # pylint: disable=g-import-not-at-top
  state = torch.load(path, map_location='cpu', weights_only=True)
  state = state.get('state_dict', state.get('model', state))
  return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def import_timm(model_name: str, weights: str, out: str, dtype: str = 'float32') -> dict:
  """Converts and writes; returns the saved metadata."""
  if model_name not in convert.TIMM_MODELS:
    raise ValueError(f'Unknown timm model {model_name!r}; supported: '
                     f'{", ".join(convert.TIMM_MODELS)}.')
  variant = convert.TIMM_MODELS[model_name]
  if models.VARIANTS[variant].head_size != convert.TIMM_HEAD_SIZE:
    raise ValueError(f'timm\'s {model_name} has {convert.TIMM_HEAD_SIZE} channels per head, '
                     f'this project\'s {variant} {models.VARIANTS[variant].head_size}; its weights '
                     f'do not fit.')
  if checkpointing.latest_metadata(out) is not None:
    raise ValueError(f'{out} already holds checkpoints; give a new --out directory.')
  if not os.path.isfile(weights):
    raise ValueError(f'No weights file {weights}.')
  state = load_state_dict(weights)
  _, variables = convert.from_timm(state, model_name)
  num_classes = int(np.shape(state['head.fc.weight'])[0])

  from configs import common  # pylint: disable=g-import-not-at-top
  config = common.get_base_config()
  config.model.name = variant
  config.model.dtype = dtype
  config.model.switches.update(dataclasses.asdict(models.TIMM_OPTIONS))
  config.num_classes = num_classes
  config.data.image_size = convert.TIMM_IMAGE_SIZE
  checkpointing.save_variables(out, config, variables, num_classes)
  return checkpointing.latest_metadata(out)


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)  # Orbax logs every step of a save at INFO.
  try:
    meta = import_timm(_MODEL.value, _WEIGHTS.value, _OUT.value, _DTYPE.value)
  except (ValueError, KeyError, OSError, checkpointing.CheckpointError) as e:
    sys.exit(f'error: {" ".join(str(e).split())}')
  print(f'Wrote {meta["model"]} ({meta["num_classes"]} classes, timm switches) to {_OUT.value}; '
        f'fine-tune with configs/finetune.py:init={_OUT.value},timm,variant={meta["model"]}')


if __name__ == '__main__':
  cli.run(main)
