r"""Writes a checkpoint of this project as a timm ``.safetensors`` state dict.

  python -m coatnet_jax.tools.export_timm --workdir DIR --model coatnet_rmlp_2_rw_224 \
      --out model.safetensors [--weights ema|params]

``DIR`` is a run (its newest checkpoint) or an ``import_timm --out``, whose model and switches must
be those of timm's ``--model`` (``convert.TIMM_MODELS``): a run with the paper's switches computes
another function than any timm model and is refused. The file then loads with
``timm.create_model(MODEL, num_classes=N, img_size=S).load_state_dict(..., strict=True)`` and gives
the same logits (tests/test_timm_parity.py); the command prints N and S (the size the relative-bias
tables were made for: the run's image size).
"""

import os

from coatnet_jax import cli  # pylint: disable=g-bad-import-order  (first: quiet start-up)
from absl import flags
from absl import logging

from coatnet_jax import architecture
from coatnet_jax import convert
from coatnet_jax import errors
from coatnet_jax import pretrained

FLAGS = flags.FLAGS


def _define_flags():
  """Only when run as a command: import_timm's flags share these names."""
  flags.DEFINE_string('workdir', None, 'A run or an import_timm --out directory.')
  flags.DEFINE_string('model', None, 'timm model name, e.g. coatnet_rmlp_2_rw_224.')
  flags.DEFINE_string('out', None, 'A new .safetensors file.')
  flags.DEFINE_enum('weights', 'ema', ['ema', 'params'],
                    'EMA parameters when the run kept them, else the raw ones.')
  flags.mark_flags_as_required(['workdir', 'model', 'out'])


def export_timm(workdir: str, model_name: str, out: str, use_ema: bool = True) -> dict:
  """Converts and writes ``out``; returns what ``timm.create_model`` needs besides the name."""
  if model_name not in convert.TIMM_MODELS:
    raise ValueError(f'Unknown timm model {model_name!r}; supported: '
                     f'{", ".join(convert.TIMM_MODELS)}.')
  if not out.endswith('.safetensors'):
    raise ValueError(f'--out {out} must end in .safetensors.')
  if os.path.exists(out):
    raise ValueError(f'{out} exists; give a new --out file.')
  spec = convert.TIMM_MODELS[model_name]
  pre = pretrained.read(workdir, use_ema=use_ema)
  have = architecture.of_metadata(pre.metadata)
  diff = architecture.switch_differences(have.options, spec.options)
  if have.name != spec.variant or diff:
    raise ValueError(f'{workdir} holds {pre.metadata.get("model")!r}, timm\'s {model_name} is '
                     f'{spec.variant!r}' + (f'; switches differ (saved, timm): {diff}' if diff
                                            else '') + '.')
  state = convert.to_timm(pre.variables, model_name)
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(state, out + '.tmp')
  os.replace(out + '.tmp', out)
  image_size = (pre.config.get('data') or {}).get('image_size') or spec.image_size
  return {'num_classes': pre.num_classes, 'img_size': image_size, 'weights': pre.weights}


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  info = export_timm(FLAGS.workdir, FLAGS.model, FLAGS.out, FLAGS.weights == 'ema')
  print(f'Wrote {FLAGS.out} ({info["weights"]} weights); load it with timm.create_model('
        f'{FLAGS.model!r}, num_classes={info["num_classes"]}, img_size={info["img_size"]})'
        f'.load_state_dict(safetensors.torch.load_file({FLAGS.out!r}), strict=True)')


if __name__ == '__main__':
  _define_flags()
  cli.run(main, user_errors=(ValueError, KeyError, OSError))
