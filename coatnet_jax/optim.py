"""The optimizer of the paper's recipes: warm-up + cosine/linear/constant, AdamW, clipping, EMA.

Weight decay skips the parameters ``config.optim.no_decay`` names: by default norms, biases and the
relative-bias tables (decaying them is a known trap for ViT-like models; see the project's
reference notes). Gradient accumulation lives in the train step (micro-batches scanned inside one
jitted step), so one optimizer update is one step everywhere: schedules, logs, checkpoints.
"""

import re

import jax
import jax.numpy as jnp
import optax


def make_schedule(config, total_steps: int, steps_per_epoch: int = 0) -> optax.Schedule:
  """Linear warm-up from 0 to ``config.lr`` then decay to ``config.min_lr``; ``config`` = optim.

  ``warmup_steps`` counts optimizer steps; ``warmup_epochs`` (if set) overrides it.
  """
  warmup = config.warmup_steps
  if config.warmup_epochs:
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
  warmup = min(warmup, total_steps)
  peak, end = config.lr, config.min_lr
  decay_steps = max(total_steps - warmup, 1)
  if config.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
  elif config.schedule == 'linear':
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif config.schedule == 'constant':
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f'Unknown schedule {config.schedule!r}: cosine, linear or constant.')
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def path_str(path) -> str:
  """'stage1_block0/expand_norm/scale' from a jax key path."""
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '/'.join(parts)


def weight_decay_mask(params, no_decay):
  """True where a parameter takes weight decay; ``no_decay`` are regexes on 'a/b/c' paths
  (``config.optim.no_decay``)."""
  patterns = [re.compile(p) for p in no_decay]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(p.search(path_str(path)) for p in patterns), params)


def make_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW with the decay mask; ``config`` is ``config.optim``."""
  no_decay = tuple(config.no_decay)
  parts = []
  if config.clip_norm:
    parts.append(optax.clip_by_global_norm(config.clip_norm))
  parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay,
                           mask=lambda p: weight_decay_mask(p, no_decay)))
  return optax.chain(*parts)


def ema_decay(step, decay: float, warmup: bool = True):
  """EMA decay at ``step``; with warm-up ``min(decay, (1 + step) / (10 + step))`` (TF's form).

  The warm-up keeps the early average from being dominated by the random initialisation.
  """
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema_params, params, decay):
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
