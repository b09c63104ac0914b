"""timm's paper-config CoAtNets (``coatnet_N_224`` in timm/models/maxxvit.py) -> this project.

timm differs from the paper only in switches that ``TIMM_OPTIONS`` reproduces, so converted weights
run through the very same model code. Layout facts the mapping relies on: PyTorch convs are
(out, in, kh, kw) and Flax's (kh, kw, in, out); timm's qkv output channels are interleaved per head
as [head][q, k, v][dim]; its relative-bias table is ((2H-1)*(2W-1), heads) in row-major order.
No torch import here: the state dict arrives as numpy arrays (``{k: v.numpy() ...}``).
"""

import dataclasses
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np

from coatnet_jax.models import CoAtNet, TIMM_OPTIONS, VARIANTS

# timm name -> this project's variant (with timm's head size and switches).
TIMM_MODELS = {
    'coatnet_0_224': 'coatnet_0',
    'coatnet_1_224': 'coatnet_1',
    'coatnet_2_224': 'coatnet_2',
    'coatnet_3_224': 'coatnet_3',
    'coatnet_4_224': 'coatnet_4',
    'coatnet_5_224': 'coatnet_5',
}
TIMM_HEAD_SIZE = 32  # timm uses 32 for every size, CoAtNet-5 included (the paper: 64).
TIMM_IMAGE_SIZE = 224

_BLOCK = {  # timm module inside a block -> ours
    'shortcut.expand': 'shortcut_proj', 'pre_norm': 'pre_norm', 'conv1_1x1': 'expand_conv',
    'norm1': 'expand_norm', 'conv2_kxk': 'depthwise_conv', 'norm2': 'depthwise_norm',
    'se.fc1': 'se/reduce', 'se.fc2': 'se/expand', 'conv3_1x1': 'project_conv',
}
_TRANSFORMER = {
    'shortcut.expand': 'shortcut_proj', 'norm1.norm': 'attn_norm', 'norm1': 'attn_norm',
    'attn.qkv': 'attention/qkv', 'attn.proj': 'attention/out',
    'attn.rel_pos': 'attention', 'norm2': 'ffn_norm', 'mlp.fc1': 'ffn_in', 'mlp.fc2': 'ffn_out',
}
_TOP = {'stem.conv1': 'stem_conv1', 'stem.norm1': 'stem_norm', 'stem.conv2': 'stem_conv2',
        'head.norm': 'head_norm', 'head.pre_logits.fc': 'pre_logits', 'head.fc': 'classifier'}


def _module_path(timm_module: str, variant) -> str:
  if timm_module in _TOP:
    return _TOP[timm_module]
  m = re.fullmatch(r'stages\.(\d+)\.blocks\.(\d+)\.(.+)', timm_module)
  if not m:
    raise ValueError(f'unexpected timm module {timm_module!r}')
  stage, block, inner = int(m[1]) + 1, int(m[2]), m[3]
  is_conv = variant.stages[stage - 1][0][0] == 'C'
  table = _BLOCK if is_conv else _TRANSFORMER
  if inner not in table:
    raise ValueError(f'unexpected timm module {timm_module!r}')
  return f'stage{stage}_block{block}/{table[inner]}'


def _to_ours(module: str, leaf: str, value: np.ndarray, want: tuple) -> np.ndarray:
  """One timm tensor in this project's layout, for the leaf ``module/leaf`` of shape ``want``."""
  if leaf == 'relative_bias':  # ((2H-1)(2W-1), heads) -> (heads, 2H-1, 2W-1)
    return value.reshape(want[1], want[2], want[0]).transpose(2, 0, 1)
  if module.endswith('attention/qkv'):  # channels [head][q, k, v][dim] -> [..., q/k/v, head, dim]
    heads, dim = want[-2], want[-1]
    if leaf == 'bias':
      return value.reshape(heads, 3, dim).transpose(1, 0, 2)
    return value.reshape(heads, 3, dim, -1).transpose(3, 1, 0, 2)
  if leaf == 'kernel' and len(want) == 4:  # conv: (out, in, kh, kw) -> (kh, kw, in, out)
    return value.transpose(2, 3, 1, 0)
  if leaf == 'kernel':  # linear or 1x1 conv used as a dense layer: (out, in, ...) -> (in, out)
    return value.reshape(value.shape[0], -1).T.reshape(want)
  return value.reshape(want)  # biases, norm scales, running statistics


def from_timm(state_dict, model_name: str):
  """Returns ``(model, variables)`` equal to timm's ``model_name`` with ``state_dict``.

  ``state_dict`` maps timm parameter names to numpy arrays. Every timm tensor must land on exactly
  one leaf of ours and every leaf must be filled, else a ValueError names what is off.
  """
  if model_name not in TIMM_MODELS:
    raise ValueError(f'Unknown timm model {model_name!r}; supported: {", ".join(TIMM_MODELS)}.')
  variant = dataclasses.replace(VARIANTS[TIMM_MODELS[model_name]], head_size=TIMM_HEAD_SIZE)
  num_classes = int(np.shape(state_dict['head.fc.weight'])[0])
  model = CoAtNet(variant, num_classes, TIMM_OPTIONS)
  images = jax.ShapeDtypeStruct((1, TIMM_IMAGE_SIZE, TIMM_IMAGE_SIZE, 3), jnp.float32)
  target = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  want = {(c,) + k: v.shape for c in target
          for k, v in flax.traverse_util.flatten_dict(target[c]).items()}

  leaves = {}
  for key, value in state_dict.items():
    timm_module, timm_leaf = key.rsplit('.', 1)
    if timm_leaf == 'num_batches_tracked':
      continue
    module = _module_path(timm_module, variant)
    if timm_leaf == 'relative_position_bias_table':
      collection, leaf = 'params', 'relative_bias'
    elif timm_leaf in ('running_mean', 'running_var'):
      collection, leaf = 'batch_stats', timm_leaf[len('running_'):]
    elif timm_leaf == 'weight':
      is_norm = 'norm' in module.rsplit('/', 1)[-1]
      collection, leaf = 'params', 'scale' if is_norm else 'kernel'
    else:
      collection, leaf = 'params', timm_leaf
    path = (collection,) + tuple(module.split('/')) + (leaf,)
    if path not in want:
      raise ValueError(f'timm tensor {key} maps to {"/".join(path)}, which this model lacks.')
    if path in leaves:
      raise ValueError(f'timm tensor {key} maps to {"/".join(path)} a second time.')
    out = _to_ours(module, leaf, np.asarray(value, np.float32), want[path])
    if out.shape != want[path]:
      raise ValueError(f'timm tensor {key} {np.shape(value)} does not fit {"/".join(path)} '
                       f'{want[path]}.')
    leaves[path] = jnp.asarray(out)
  missing = sorted('/'.join(p) for p in want if p not in leaves)
  if missing:
    raise ValueError(f'{len(missing)} leaves not in the timm state dict, e.g. {missing[:3]}.')
  return model, flax.traverse_util.unflatten_dict(leaves)
