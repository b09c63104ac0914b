r"""Imports a timm CoAtNet checkpoint (any in ``convert.TIMM_MODELS``) as a model-only checkpoint.

  python -m coatnet_jax.tools.import_timm --model coatnet_rmlp_2_rw_224 \
      --weights model.safetensors --out DIR [--image_size 224]

DIR then serves as ``init=DIR,timm`` of ``configs/transfer.py`` and ``configs/finetune.py`` (the
``timm`` argument builds the architecture saved in DIR), and works with ``evaluate``,
``tools.export`` and ``predict``. The weights go through ``convert.from_timm``, whose numbers
tests/test_timm_parity.py checks against timm itself; the config saved with them names the layout
and timm's switches for that model, so that every later run builds the same function. Parameters
are saved in float32. ``--image_size`` is the ``img_size`` the timm model was made with (default:
the size in its name); it fixes the size of the relative-bias tables.

Nothing is downloaded: fetch the file yourself (for example ``model.safetensors`` from the model's
Hugging Face page, timm/<model>.<tag>). ``.safetensors`` files need only the ``safetensors``
package; ``.pth``/``.bin`` files need torch and are read with ``weights_only=True``: a file that
holds anything but tensors is refused. timm's ``coatnet_5_224`` uses 32 channels per head where
the paper's (and this project's) uses 64, so it is refused rather than imported into a model it
does not match.
"""

import dataclasses
import os
import pickle
import re

from coatnet_jax import cli  # pylint: disable=g-bad-import-order  (first: quiet start-up)
from absl import flags
from absl import logging
import numpy as np

from coatnet_jax import checkpointing
from coatnet_jax import convert
from coatnet_jax import errors
from coatnet_jax import models

FLAGS = flags.FLAGS


def _define_flags():
  """Only when run as a command: other tools' flags share these names in one test process."""
  flags.DEFINE_string('model', None, 'timm model name, e.g. coatnet_rmlp_2_rw_224.')
  flags.DEFINE_string('weights', None, 'A .safetensors (or .pth/.bin) state dict.')
  flags.DEFINE_string('out', None, 'A new directory for the checkpoint.')
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                    'Compute dtype saved with the weights (what evaluate, export and a '
                    'fine-tune use unless told otherwise); parameters stay float32.')
  flags.DEFINE_integer('image_size', None,
                       'img_size the timm model was made with (default: its name\'s).')
  flags.mark_flags_as_required(['model', 'weights', 'out'])


def load_state_dict(path: str) -> dict:
  """timm parameter name -> numpy array, from a safetensors or torch file.

  Anything unreadable raises a ValueError of one line that names the file.
  """
  if not os.path.isfile(path):
    raise ValueError(f'No weights file {path}.')
  if path.endswith('.safetensors'):
    from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      return load_file(path)
    except (SafetensorError, OSError) as e:
      raise ValueError(f'{path} is not a readable safetensors file: '
                       f'{errors.describe(e)}') from None
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(f'{path}: reading a .pth/.bin file needs torch (pip install torch); or '
                     f'give the .safetensors file of the same model.') from None
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    found = re.search(r'Unsupported global: GLOBAL ([\w.]+)', str(e))
    what = f' (it calls {found[1]})' if found else ''
    raise ValueError(f'{path} refused: it holds Python objects, not only tensors{what}, and is '
                     f'not unpickled; give the .safetensors file of the same model.') from None
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{path} is not a readable torch file: '
                     f'{errors.describe(e)}') from None
  if isinstance(state, dict):
    state = state.get('state_dict', state.get('model', state))
  if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
    raise ValueError(f'{path} holds no state dict of tensors.')
  return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def import_timm(model_name: str, weights: str, out: str, image_size=None,
                dtype: str = 'float32') -> dict:
  """Converts and writes; returns the saved metadata."""
  if model_name not in convert.TIMM_MODELS:
    raise ValueError(f'Unknown timm model {model_name!r}; supported: '
                     f'{", ".join(convert.TIMM_MODELS)}.')
  spec = convert.TIMM_MODELS[model_name]
  if models.VARIANTS[spec.variant].head_size != spec.head_size:
    raise ValueError(f'timm\'s {model_name} has {spec.head_size} channels per head, this '
                     f'project\'s {spec.variant} {models.VARIANTS[spec.variant].head_size}; its '
                     f'weights do not fit.')
  if checkpointing.latest_metadata(out) is not None:
    raise ValueError(f'{out} already holds checkpoints; give a new --out directory.')
  state = load_state_dict(weights)
  image_size = image_size or spec.image_size
  try:
    _, variables = convert.from_timm(state, model_name, image_size)
  except ValueError as e:
    raise ValueError(f'{weights}: {e}') from None
  num_classes = int(np.shape(state['head.fc.weight'])[0])

  from configs import common  # pylint: disable=g-import-not-at-top
  config = common.get_base_config()
  config.model.name = spec.variant
  config.model.dtype = dtype
  config.model.switches.update(dataclasses.asdict(spec.options))
  config.num_classes = num_classes
  config.data.image_size = image_size
  checkpointing.save_variables(out, config, variables, num_classes)
  return checkpointing.latest_metadata(out)


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)  # Orbax logs every step of a save at INFO.
  meta = import_timm(FLAGS.model, FLAGS.weights, FLAGS.out, FLAGS.image_size, FLAGS.dtype)
  print(f'Wrote {meta["model"]} with the switches of timm\'s {FLAGS.model} '
        f'({meta["num_classes"]} classes) to {FLAGS.out}; fine-tune with '
        f'configs/transfer.py:data_dir=DATA,init={FLAGS.out},timm or '
        f'configs/finetune.py:init={FLAGS.out},timm,variant=coatnet_N')


if __name__ == '__main__':
  _define_flags()
  cli.run(main, user_errors=(ValueError, KeyError, OSError))
