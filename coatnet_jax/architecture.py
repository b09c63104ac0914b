"""Which model a run builds, and whether a checkpoint's model can serve it.

``config.model.name`` names a layout: one of ``models.VARIANTS``, or one the config writes out
itself in ``model.extra_variants`` (a size the table lacks; the table is never changed).
``model.switches`` set fields of ``models.Options``. Both are resolved here, once, for a run's
config and for a checkpoint's saved config alike: the layout found, every switch filled in with
its default, so a switch spelled out at its default names the same model as one left out.

A checkpoint serves a run at one of two strictnesses (``refusal``):

* resume (strict): the same parameter tree -- layout, every switch and the class count, compared
  by the architecture id in its metadata (``checkpointing.make_metadata``);
* fine-tune (lenient): what ``pretrained.adapt`` can fit -- the same layout and the switches that
  change what the model computes; the class count (a new head), the image size (relative tables
  resized) and BatchNorm's momentum (training only) may differ.
"""

import dataclasses
import hashlib
import json
from typing import Optional

from coatnet_jax import models

# Bump when the parameter tree a (variant, switches, num_classes) builds changes meaning.
ARCHITECTURE_VERSION = 1

# Fields of models.Variant / models.Options added after ARCHITECTURE_VERSION 1 (timm's rw models):
# they enter the id only when set away from their default, so earlier ids stay valid.
_LATER_FIELDS = {
    'variant': ('stem_hidden',),
    'switches': ('conv_act', 'mbconv_pre_norm_act', 'mbconv_expand_from', 'mbconv_output_bias',
                 'se_act', 'se_early', 'attention_width', 'transformer_shortcut_bias',
                 'transformer_norm', 'layer_scale', 'rel_pos', 'rel_pos_mlp_width', 'head_norm',
                 'input_norm'),
}
# Switches that change training only, not the function a checkpoint's weights compute.
_TRAINING_ONLY = ('bn_momentum',)


@dataclasses.dataclass(frozen=True)
class Architecture:
  """A model as its parameters see it: a named layout and every switch."""

  name: str
  variant: models.Variant
  options: models.Options


def of_model_config(model) -> Architecture:
  """The model that ``config.model`` (a ConfigDict), or the model part of any earlier run's saved
  config (JSON), names. Saved configs older than ``extra_variants`` or ``switches`` lack them; this
  is the one place that reads them at their defaults. ``ValueError`` names an unknown layout, a
  malformed written-out one, or an unknown switch."""
  name = model['name']
  extra = dict(model.get('extra_variants') or {})
  if name in extra:
    if name in models.VARIANTS:
      raise ValueError(f'model.extra_variants.{name} would redefine the table\'s {name}; give the '
                       f'new layout another name.')
    try:
      variant = models.variant_from_data(extra[name])
    except ValueError as e:
      raise ValueError(f'model.extra_variants.{name}: {e}') from None
  elif name in models.VARIANTS:
    variant = models.VARIANTS[name]
  else:
    raise ValueError(f'Unknown model {name!r}; valid names: {", ".join(models.VARIANTS)}, or a '
                     f'layout written out in model.extra_variants.')
  switches = dict(model.get('switches') or {})
  valid = {f.name for f in dataclasses.fields(models.Options)}
  unknown = sorted(set(switches) - valid)
  if unknown:
    raise ValueError(f'Unknown model switch(es) {unknown}; valid switches: {sorted(valid)}.')
  return Architecture(name, variant, dataclasses.replace(models.Options(), **switches))


def of_metadata(metadata: dict) -> Architecture:
  """The model a checkpoint holds, from its metadata (its model name and saved config)."""
  saved = dict((metadata.get('config') or {}).get('model') or {})
  saved['name'] = metadata['model']
  return of_model_config(saved)


def architecture_id(config, num_classes: int) -> str:
  """A short hash of what fixes the parameter tree: layout, switches, classes, version."""
  arch = of_model_config(config.model)
  desc = {'variant': dataclasses.asdict(arch.variant),
          'switches': dataclasses.asdict(arch.options),
          'num_classes': int(num_classes), 'version': ARCHITECTURE_VERSION}
  defaults = {'variant': {'stem_hidden': None},
              'switches': dataclasses.asdict(models.Options())}
  for part, later in _LATER_FIELDS.items():
    for field in later:
      if desc[part][field] == defaults[part][field]:
        del desc[part][field]
  blob = json.dumps(desc, sort_keys=True, default=str).encode()
  return f'v{ARCHITECTURE_VERSION}-{hashlib.sha256(blob).hexdigest()[:16]}'


def switch_differences(have: models.Options, want: models.Options) -> dict:
  """{switch: (have, want)} of the switches that change what the model computes and differ."""
  a, b = dataclasses.asdict(have), dataclasses.asdict(want)
  return {k: (a[k], b[k]) for k in b if a[k] != b[k] and k not in _TRAINING_ONLY}


def refusal(saved: dict, expected: dict, where: str, fine_tune: bool = False) -> Optional[str]:
  """Why the checkpoint with metadata ``saved`` cannot serve a run whose metadata would be
  ``expected`` (``checkpointing.make_metadata``), in one line; None when it can.

  Strict (resume) unless ``fine_tune``: see the module's docstring.
  """
  if not fine_tune:
    if saved.get('architecture') == expected['architecture']:
      return None
    return (f'{where} holds checkpoints of model {saved.get("model")!r} (architecture '
            f'{saved.get("architecture")}, {saved.get("num_classes")} classes); this config '
            f'builds {expected["model"]!r} (architecture {expected["architecture"]}, '
            f'{expected["num_classes"]} classes). Use another workdir, or set '
            f'--config.allow_partial_load=True to load the matching leaves.')
  want = of_metadata(expected)
  try:
    have = of_metadata(saved)
  except ValueError:  # A layout this code does not know: not the one this config builds.
    have = None
  diff = switch_differences(have.options, want.options) if have else {}
  if have and have.variant == want.variant and not diff:
    return None
  layout = (have and have.name == want.name and have.variant != want.variant)
  return (f'{where} holds {saved.get("model")!r} but this config builds {want.name!r}'
          + ('; their layouts differ (model.extra_variants)' if layout else '')
          + (f'; switches differ (saved, config): {diff}' if diff else '')
          + '. Use the same variant and switches as the source (weights imported from timm need '
            'the :timm config argument).')
