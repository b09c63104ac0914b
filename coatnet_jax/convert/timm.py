"""timm's CoAtNets (timm/models/maxxvit.py) <-> this project: names, layouts, and which switches.

Every timm CoAtNet is one of this project's layouts (``models.VARIANTS``) with a set of
``models.Options`` switches, so converted weights run through the very same model code; the table
``TIMM_MODELS`` says which. Layout facts the mapping relies on: PyTorch convs are (out, in, kh, kw)
and Flax's (kh, kw, in, out); timm's attention, shortcut and FFN layers are 1x1 convs, its head
and relative-position MLP linear layers (out, in); its qkv output channels are interleaved per head
as [head][q, k, v][dim]; its relative-bias table is ((2H-1)*(2W-1), heads) in row-major order.
No torch import here: state dicts are dicts of numpy arrays (``{k: v.numpy() ...}``).
"""

import dataclasses
import re
from typing import Optional, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np

from coatnet_jax.models import CoAtNet, Options, TIMM_OPTIONS, VARIANTS


@dataclasses.dataclass(frozen=True)
class TimmModel:
  """What one timm model name is here: a layout, its switches, and the size in its name."""

  variant: str  # A key of models.VARIANTS.
  options: Options
  image_size: int
  head_size: int = 32  # timm uses 32 everywhere (for coatnet_5 the paper uses 64).


# _rw_coat_cfg / _rw_max_cfg of timm/models/maxxvit.py, on top of timm's general switches; the
# input normalisation is that of the weights timm publishes (its pretrained_cfg mean and std).
# timm's models take inputs as timm normalises them; ``timm_input`` maps ours to theirs.
_RW = dataclasses.replace(
    TIMM_OPTIONS, conv_act='silu', mbconv_expand_from='input', attention_width='input',
    head_pre_logits=False, head_norm='spatial', input_norm='half')
_RW_COAT = dataclasses.replace(_RW, mbconv_stride='pool', mbconv_pre_norm_act=True,
                               mbconv_output_bias=False, se_act='relu')
_RW_MAX = dataclasses.replace(_RW, mbconv_stride='depthwise')


def _rw_coat(**switches):
  return dataclasses.replace(_RW_COAT, **switches)


def _rw_max(**switches):
  return dataclasses.replace(_RW_MAX, **switches)


_TIMM_CONFIGS = {  # timm config name -> (layout, switches), as timm's model_cfgs set them.
    'coatnet_pico_rw': ('coatnet_pico_rw', _rw_max()),
    'coatnet_nano_rw': ('coatnet_nano_rw', _rw_max(mbconv_stride='pool')),
    'coatnet_0_rw': ('coatnet_0_rw', _rw_coat(se_early=True, transformer_shortcut_bias=False)),
    'coatnet_1_rw': ('coatnet_1_rw', _rw_coat(mbconv_stride='depthwise', se_early=True,
                                              transformer_shortcut_bias=False)),
    'coatnet_2_rw': ('coatnet_2_rw', _rw_coat(mbconv_stride='depthwise', se_act='silu')),
    'coatnet_3_rw': ('coatnet_3_rw', _rw_coat(mbconv_stride='depthwise', se_act='silu',
                                              layer_scale=1e-6)),
    'coatnet_bn_0_rw': ('coatnet_0_rw', _rw_coat(
        mbconv_stride='depthwise', se_early=True, transformer_shortcut_bias=False,
        transformer_norm='batch', input_norm='imagenet')),  # trained on ImageNet's mean/std
    'coatnet_rmlp_nano_rw': ('coatnet_nano_rw', _rw_max(rel_pos='mlp', rel_pos_mlp_width=384)),
    'coatnet_rmlp_0_rw': ('coatnet_0_rw', _rw_coat(mbconv_stride='depthwise', rel_pos='mlp')),
    'coatnet_rmlp_1_rw': ('coatnet_1_rw', _rw_coat(
        pool='max3', se_early=True, transformer_shortcut_bias=False, rel_pos='mlp',
        rel_pos_mlp_width=384)),
    'coatnet_rmlp_1_rw2': ('coatnet_1_rw', _rw_coat(mbconv_stride='depthwise', rel_pos='mlp')),
    'coatnet_rmlp_2_rw': ('coatnet_2_rw', _rw_coat(mbconv_stride='depthwise', se_act='silu',
                                                   layer_scale=1e-6, rel_pos='mlp')),
    'coatnet_rmlp_3_rw': ('coatnet_3_rw', _rw_coat(mbconv_stride='depthwise', se_act='silu',
                                                   layer_scale=1e-6, rel_pos='mlp')),
}
_TIMM_CONFIGS.update({f'coatnet_{n}': (f'coatnet_{n}', TIMM_OPTIONS) for n in range(6)})

# timm model name -> TimmModel: every timm CoAtNet, trained weights or not.
TIMM_MODELS = {
    f'{config}_{size}': TimmModel(variant, options, size)
    for config, (variant, options) in _TIMM_CONFIGS.items()
    for size in ((224, 384) if config == 'coatnet_rmlp_2_rw' else (224,))
}

_MBCONV = {  # this project's module inside an MBConv block -> timm's
    'shortcut_proj': 'shortcut.expand', 'pre_norm': 'pre_norm', 'expand_conv': 'conv1_1x1',
    'expand_norm': 'norm1', 'depthwise_conv': 'conv2_kxk', 'depthwise_norm': 'norm2',
    'se/reduce': 'se.fc1', 'se/expand': 'se.fc2', 'project_conv': 'conv3_1x1',
}
_TRANSFORMER = {
    'shortcut_proj': 'shortcut.expand', 'attn_norm': 'norm1', 'attention/qkv': 'attn.qkv',
    'attention/out': 'attn.proj', 'attention/rel_pos_mlp/fc1': 'attn.rel_pos.mlp.fc1',
    'attention/rel_pos_mlp/fc2': 'attn.rel_pos.mlp.fc2', 'ffn_norm': 'norm2',
    'ffn_in': 'mlp.fc1', 'ffn_out': 'mlp.fc2',
}
_TOP = {'stem_conv1': 'stem.conv1', 'stem_norm': 'stem.norm1', 'stem_conv2': 'stem.conv2',
        'pre_logits': 'head.pre_logits.fc', 'classifier': 'head.fc'}
_PARAM_LEAVES = {  # a leaf that is a parameter of its block itself -> timm's name
    'relative_bias': 'attn.rel_pos.relative_position_bias_table', 'attn_scale': 'ls1.gamma',
    'ffn_scale': 'ls2.gamma',
}
_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
         'var': 'running_var'}


def _block_kinds(variant) -> dict:
  """'stage{s}_block{b}' -> 'C' or 'T'."""
  kinds = {}
  for s, stage in enumerate(variant.stages, start=1):
    b = 0
    for kind, _, depth in stage:
      for _ in range(depth):
        kinds[f'stage{s}_block{b}'] = kind
        b += 1
  return kinds


def _timm_key(path: tuple, kinds: dict, options: Options) -> str:
  """timm's state-dict key of one leaf of ours, ``path`` = (collection, module..., leaf)."""
  _, *modules, leaf = path
  top = modules[0] if modules else leaf
  if top == 'head_norm':
    return f'{"norm" if options.head_norm == "spatial" else "head.norm"}.{_LEAF[leaf]}'
  if top in _TOP:
    return f'{_TOP[top]}.{_LEAF[leaf]}'
  m = re.fullmatch(r'stage(\d+)_block(\d+)', top)
  if not m or top not in kinds:
    raise ValueError(f'{"/".join(path[1:])} has no timm counterpart.')
  prefix = f'stages.{int(m[1]) - 1}.blocks.{m[2]}.'
  inner = '/'.join(modules[1:])
  if leaf in _PARAM_LEAVES and inner in ('', 'attention'):
    return prefix + _PARAM_LEAVES[leaf]
  table = _MBCONV if kinds[top] == 'C' else _TRANSFORMER
  if inner not in table:
    raise ValueError(f'{"/".join(path[1:])} has no timm counterpart.')
  name = table[inner]
  if kinds[top] == 'C' and options.se_early and name.startswith('se.'):
    name = 'se_early.' + name[len('se.'):]
  if name == 'norm1' and kinds[top] == 'T' and m[2] == '0':  # stride 2: norm, then pool
    name = 'norm1.norm'
  return prefix + f'{name}.{_LEAF[leaf]}'


def _is_timm_linear(path: tuple) -> bool:
  """Dense kernels that are Linear layers in timm (the rest of its dense layers are 1x1 convs)."""
  return path[1] in ('pre_logits', 'classifier') or 'rel_pos_mlp' in path


def _to_ours(path: tuple, value: np.ndarray, want: tuple) -> np.ndarray:
  """One timm tensor in this project's layout, for the leaf ``path`` of shape ``want``."""
  leaf, module = path[-1], '/'.join(path[1:-1])
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
  return value.reshape(want)  # biases, norm scales, running statistics, layer scales


def _to_timm(path: tuple, value: np.ndarray) -> np.ndarray:
  """The inverse of ``_to_ours``: one leaf of ours in timm's layout."""
  leaf, module = path[-1], '/'.join(path[1:-1])
  if leaf == 'relative_bias':
    return value.transpose(1, 2, 0).reshape(-1, value.shape[0])
  if module.endswith('attention/qkv'):
    if leaf == 'bias':
      return value.transpose(1, 0, 2).reshape(-1)
    dense = value.transpose(2, 1, 3, 0).reshape(-1, value.shape[0])
  elif leaf == 'kernel' and value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  elif leaf == 'kernel':
    dense = value.reshape(-1, value.shape[-1]).T
  else:
    return value.reshape(-1)
  return dense if _is_timm_linear(path) else dense[:, :, None, None]


def timm_input(images_nhwc, model_name: str) -> np.ndarray:
  """timm's NCHW input equal to ``images_nhwc`` as this project normalises them (ImageNet's mean
  and std), for timm's ``model_name``: what to feed each side to compare logits."""
  from coatnet_jax.models import coatnet  # pylint: disable=g-import-not-at-top
  x = np.asarray(images_nhwc, np.float64)
  if _lookup(model_name).options.input_norm == 'half':
    pixels = x * np.asarray(coatnet.IMAGENET_STDDEV_RGB) + np.asarray(coatnet.IMAGENET_MEAN_RGB)
    x = pixels / 127.5 - 1.0
  return np.ascontiguousarray(x.transpose(0, 3, 1, 2), np.float32)


def _lookup(model_name: str) -> TimmModel:
  if model_name not in TIMM_MODELS:
    raise ValueError(f'Unknown timm model {model_name!r}; supported: {", ".join(TIMM_MODELS)}.')
  return TIMM_MODELS[model_name]


def timm_model(model_name: str, num_classes: int) -> CoAtNet:
  """This project's model that computes what timm's ``model_name`` computes."""
  spec = _lookup(model_name)
  variant = dataclasses.replace(VARIANTS[spec.variant], head_size=spec.head_size)
  return CoAtNet(variant, num_classes, spec.options)


def _image_hw(model_name: str, image_size) -> tuple[int, int]:
  if image_size is None:
    image_size = _lookup(model_name).image_size
  h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  if h % 32 or w % 32:
    raise ValueError(f'image_size {h}x{w}: timm builds its CoAtNets for sizes divisible by 32.')
  return h, w


def _target(model, hw) -> dict:
  """{(collection, module..., leaf): shape} of ``model``'s variables at ``hw``."""
  images = jax.ShapeDtypeStruct((1, hw[0], hw[1], 3), jnp.float32)
  target = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  return {(c,) + k: v.shape for c in target
          for k, v in flax.traverse_util.flatten_dict(target[c]).items()}


def from_timm(state_dict, model_name: str,
              image_size: Optional[Union[int, tuple[int, int]]] = None):
  """Returns ``(model, variables)`` equal to timm's ``model_name`` with ``state_dict``.

  ``state_dict`` maps timm parameter names to numpy arrays; ``image_size`` (int or (H, W)) is the
  ``img_size`` timm's model was made with (default: the size in its name), which fixes the size of
  its relative-bias tables (the rmlp models have none). Every timm tensor must land on exactly one
  leaf of ours and every leaf must be filled, else a ValueError names the timm tensor.
  """
  hw = _image_hw(model_name, image_size)
  if 'head.fc.weight' not in state_dict:
    raise ValueError('missing tensor head.fc.weight (the classifier).')
  model = timm_model(model_name, int(np.shape(state_dict['head.fc.weight'])[0]))
  kinds = _block_kinds(model.variant)
  want = _target(model, hw)
  keys = {path: _timm_key(path, kinds, model.options) for path in want}
  unexpected = sorted(set(state_dict) - set(keys.values())
                      - {k for k in state_dict if k.endswith('.num_batches_tracked')})
  if unexpected:
    raise ValueError(f'unexpected tensor {unexpected[0]} ({len(unexpected)} in all): not a '
                     f'{model_name} state dict.')
  leaves = {}
  for path, key in keys.items():
    if key not in state_dict:
      raise ValueError(f'missing tensor {key} (for {"/".join(path[1:])}).')
    value = np.asarray(state_dict[key], np.float32)
    try:
      out = _to_ours(path, value, want[path])
    except ValueError:
      out = None
    if out is None or out.shape != want[path]:
      hint = (f'; its relative-bias tables were made for another image size (pass image_size=, '
              f'here {hw[0]}x{hw[1]})' if path[-1] == 'relative_bias' else '')
      raise ValueError(f'tensor {key} has shape {tuple(np.shape(value))}, which does not fit '
                       f'{"/".join(path[1:])} {tuple(want[path])}{hint}.')
    leaves[path] = jnp.asarray(out)
  return model, flax.traverse_util.unflatten_dict(leaves)


def to_timm(variables, model_name: str) -> dict:
  """timm's state dict (numpy float32; BatchNorm's ``num_batches_tracked`` as int64 0) of
  ``variables`` of ``timm_model(model_name, ...)``: ``timm.create_model(model_name,
  img_size=...)`` loads it with ``strict=True``, at the size the relative-bias tables were made for.
  Traceable too: ``jax.eval_shape`` of it maps keys and shapes without computing anything.
  """
  flat = {(c,) + k: _host(v) for c in ('params', 'batch_stats') if c in variables
          for k, v in flax.traverse_util.flatten_dict(dict(variables[c])).items()}
  if ('params', 'classifier', 'kernel') not in flat:
    raise ValueError('variables have no classifier/kernel: not a CoAtNet variables tree.')
  model = timm_model(model_name, flat[('params', 'classifier', 'kernel')].shape[-1])
  want = _target(model, _image_hw(model_name, None))
  missing = sorted('/'.join(p[1:]) for p in want if p not in flat)
  extra = sorted('/'.join(p[1:]) for p in flat if p not in want)
  if missing or extra:
    raise ValueError(f'variables are not those of timm\'s {model_name}: '
                     + (f'missing {missing[:3]}' if missing else f'unexpected {extra[:3]}') + '.')
  for path, value in flat.items():
    if path[-1] != 'relative_bias' and value.shape != want[path]:
      raise ValueError(f'{"/".join(path[1:])} has shape {value.shape}, timm\'s {model_name} '
                       f'{tuple(want[path])}.')
  kinds = _block_kinds(model.variant)
  out = {}
  for path, value in flat.items():
    key = _timm_key(path, kinds, model.options)
    value = _to_timm(path, value.astype(np.float32))
    out[key] = value if isinstance(value, jax.core.Tracer) else np.ascontiguousarray(value)
    if path[-1] == 'mean':
      out[key.rsplit('.', 1)[0] + '.num_batches_tracked'] = np.zeros((), np.int64)
  return out


def _host(value):
  """A numpy array, unless ``to_timm`` is being traced."""
  return value if isinstance(value, jax.core.Tracer) else np.asarray(value)
