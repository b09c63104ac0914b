"""The step and what it needs: train state, init, train step, eval step, exact evaluation.

The loop (``train``), the tools (``evaluate``, ``tools/fit``, ``tools/export``) and the benchmarks
import these, so that every one of them runs the trainer's own step. Pixels arrive uint8 and
``normalize`` turns them into model inputs on the device, inside the jitted steps: the one place
that does, and a 4x smaller host-to-device transfer than float inputs.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics as clu_metrics

from coatnet_jax import architecture
from coatnet_jax import eval_metrics
from coatnet_jax import input_pipeline
from coatnet_jax import losses
from coatnet_jax import models
from coatnet_jax import optim
from coatnet_jax import sharding

# ImageNet statistics in 0..255 pixel units, declared once beside the model (whose 'half' input
# norm undoes them for timm's weights); the digits use them too, so one code path serves all.
MEAN_RGB, STDDEV_RGB = models.coatnet.IMAGENET_MEAN_RGB, models.coatnet.IMAGENET_STDDEV_RGB


def normalize(images, dtype=jnp.float32):
  """uint8 pixels -> normalised model inputs; runs on the device inside the jitted steps."""
  mean = jnp.asarray(MEAN_RGB, jnp.float32)
  std = jnp.asarray(STDDEV_RGB, jnp.float32)
  return ((jnp.asarray(images, jnp.float32) - mean) / std).astype(dtype)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any  # None when EMA is off.
  rng: jax.Array  # Raw key data (uint32), so Orbax saves it like any array.


def dtype_of(name: str):
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[name]


def build_model(config, num_classes: int):
  m = config.model
  arch = architecture.of_model_config(m)  # The layout and switches, resolved.
  return models.get_model(arch.variant, num_classes, dtype=dtype_of(m.dtype),
                          drop_path_rate=m.drop_path_rate, remat=m.remat, options=arch.options)


def total_steps(config, train_size: int) -> int:
  if config.total_steps:
    return config.total_steps
  return max(int(config.num_epochs * train_size // config.batch_size), config.min_steps)


def build_optimizer(config, train_size: int):
  """The schedule and optax transformation a config asks for (also used by config checks)."""
  steps_per_epoch = max(train_size // config.batch_size, 1)
  schedule = optim.make_schedule(config.optim, total_steps(config, train_size), steps_per_epoch)
  return schedule, optim.make_optimizer(config.optim, schedule)


def make_init_fn(config, model, tx):
  """A function of no arguments building the full train state; jitted with out_shardings."""
  size = config.data.image_size

  def init():
    params_key, dropout_key, train_key = jax.random.split(jax.random.key(config.seed), 3)
    dummy = jnp.zeros((1, size, size, 3), dtype_of(config.model.dtype))
    variables = model.init({'params': params_key, 'dropout': dropout_key}, dummy, train=False)
    params = variables['params']
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
        ema_params=params if config.ema.decay else None,
        rng=jax.random.key_data(train_key))

  return init


def make_train_step(config, model, tx, schedule, num_classes: int, mesh, class_weights=None):
  """(state, batch) -> (state, metrics). A non-finite step leaves all but the optimizer moments
  untouched (see below).

  ``class_weights`` (one per class; ``losses.balanced_class_weights``) weight each example's loss
  by its label's weight; after Mixup/CutMix an example keeps the weight of its own label.
  """
  lc, accum = config.loss, config.accum_steps
  compute_dtype = dtype_of(config.model.dtype)
  weights = None if class_weights is None else jnp.asarray(class_weights, jnp.float32)

  def loss_fn(params, batch_stats, images, targets, example_weights, key):
    logits, new_vars = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                   train=True, mutable=['batch_stats'], rngs={'dropout': key})
    loss = losses.per_example_loss(logits, targets, lc.kind)
    if example_weights is not None:
      loss = loss * example_weights
    return loss.mean(), new_vars['batch_stats']

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    mix_key, drop_key = jax.random.split(key)
    images = normalize(batch['image'], compute_dtype)
    targets = losses.smooth_targets(batch['label'], num_classes, lc.label_smoothing)
    images, targets = losses.mix(mix_key, images, targets, lc.mixup_alpha, lc.cutmix_alpha,
                                 lc.switch_prob)
    example_weights = None if weights is None else weights[batch['label']]
    (loss, batch_stats), grads = _accumulated(grad_fn, accum, mesh, state.params,
                                              state.batch_stats, images, targets,
                                              example_weights, drop_key)
    grad_norm = optax.tree.norm(grads)
    lr = schedule(state.step)
    # Finiteness from three scalars, never a scan of the state: with a finite loss, gradient
    # norm and learning rate, AdamW's update is finite. A non-finite step changes no parameter,
    # BatchNorm statistic, EMA or step count: its update is zeroed, a select inside the update's
    # own elementwise pass (a select between the whole old and new state, or a lax.cond over the
    # update, costs copies of the state: DEVELOPERS.md). Its optimizer moments may change or be
    # non-finite; the loop stops at the next check and checks every step before any save, so
    # nothing non-finite is saved.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(lr)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
    params = optax.apply_updates(state.params, updates)
    ema_params = state.ema_params
    if ema_params is not None:
      decay = optim.ema_decay(state.step, config.ema.decay, config.ema.warmup)
      # Decay 1 keeps the average exactly (1 * e + 0 * p, p finite): a scalar, not a select.
      ema_params = optim.ema_update(ema_params, params, jnp.where(finite, decay, 1.0))
    # The step counter and BatchNorm statistics are tiny: selected whole.
    batch_stats = jax.tree.map(lambda n, o: jnp.where(finite, n, o), batch_stats,
                               state.batch_stats)
    new_state = state.replace(step=jnp.where(finite, state.step + 1, state.step), params=params,
                              batch_stats=batch_stats, opt_state=opt_state, ema_params=ema_params)
    return new_state, {'loss': loss, 'grad_norm': grad_norm, 'lr': lr, 'finite': finite}

  return train_step


def _accumulated(grad_fn, accum, mesh, params, batch_stats, images, targets, example_weights,
                 key):
  """((mean loss, batch_stats), mean gradients) over ``accum`` micro-batches of the batch, scanned
  so that only one micro-batch's activations are alive at a time."""
  if accum == 1:
    return grad_fn(params, batch_stats, images, targets, example_weights, key)

  # Micro-batch i takes rows i, i + accum, ...: every device contributes to every micro-batch.
  def split(x):
    x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(
        x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.AXES)))

  def body(carry, xs):
    grads_sum, loss_sum, batch_stats = carry
    (l, batch_stats), g = grad_fn(params, batch_stats, xs[0], xs[1], xs[3],
                                  jax.random.fold_in(key, xs[2]))
    return (jax.tree.map(jnp.add, grads_sum, g), loss_sum + l, batch_stats), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  (grads, loss, batch_stats), _ = jax.lax.scan(
      body, (zeros, jnp.zeros((), jnp.float32), batch_stats),
      (split(images), split(targets), jnp.arange(accum),
       None if example_weights is None else split(example_weights)))
  return (loss / accum, batch_stats), jax.tree.map(lambda g: g / accum, grads)


def abstract_batch(config, batch: int, num_classes: int, batch_sharding, with_mask=False):
  """Shapes of one global batch, for ahead-of-time compilation (the trainer and tools.fit)."""
  size = config.data.image_size
  label_shape, label_dtype = input_pipeline.label_spec(config.data, num_classes)
  b = {'image': jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8, sharding=batch_sharding),
       'label': jax.ShapeDtypeStruct((batch,) + label_shape, label_dtype, sharding=batch_sharding)}
  if with_mask:
    b['mask'] = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_sharding)
  return b


def jit_train_step(config, model, tx, schedule, num_classes: int, mesh, state_shardings,
                   class_weights=None):
  """The train step jitted over ``mesh`` with a donated, sharded state."""
  return jax.jit(make_train_step(config, model, tx, schedule, num_classes, mesh, class_weights),
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))


@flax.struct.dataclass
class EvalMetrics(clu_metrics.Collection):
  """What evaluation accumulates: masked averages over the real (mask 1) examples."""
  loss: clu_metrics.Average.from_output('loss')
  correct1: clu_metrics.Average.from_output('correct1')
  correct5: clu_metrics.Average.from_output('correct5')


def make_eval_step(config, model, num_classes: int):
  """(params, batch_stats, batch) -> EvalMetrics (and sums) over the real (mask=1) examples.

  With ``config.classification_metrics`` (single-label data) also the (C, C) confusion counts and,
  for two classes, every example's positive-class probability under 'examples' (for ROC AUC).
  """
  kind = config.loss.kind
  per_class = config.classification_metrics
  compute_dtype = dtype_of(config.model.dtype)

  def eval_step(params, batch_stats, batch):
    logits = model.apply({'params': params, 'batch_stats': batch_stats},
                         normalize(batch['image'], compute_dtype), train=False)
    mask, labels = batch['mask'], batch['label']
    top1 = jnp.argmax(logits, axis=-1)
    if labels.ndim == 1:
      correct1 = top1 == labels
      top5 = jax.lax.top_k(logits, min(5, num_classes))[1]
      correct5 = jnp.any(top5 == labels[:, None], axis=-1)
    else:  # Multi-hot: precision@1 is whether the top class is one of the labels.
      correct1 = jnp.take_along_axis(labels, top1[:, None], axis=-1)[:, 0] > 0
      correct5 = correct1
    loss = losses.per_example_loss(logits, losses.smooth_targets(labels, num_classes, 0.0), kind)
    out = {'metrics': EvalMetrics.single_from_model_output(
        loss=loss, correct1=correct1.astype(jnp.float32), correct5=correct5.astype(jnp.float32),
        mask=mask > 0)}
    if per_class and labels.ndim == 1:
      out['confusion'] = eval_metrics.confusion_counts(labels, top1, mask, num_classes)
      if num_classes == 2:
        probs = jax.nn.softmax(logits) if kind == 'softmax' else jax.nn.sigmoid(logits)
        out['examples'] = {'score': probs[:, 1], 'label': labels, 'mask': mask}
    return out

  return eval_step


def evaluate(eval_fn, params, batch_stats, batches, mesh, kind: str, class_names=()) -> dict:
  """Runs ``eval_fn`` over every batch; exact counts because padding carries mask 0.

  Scalars only: with classification metrics on, the confusion matrix comes back as
  'confusion/<true>/<predicted>' counts (``eval_metrics.flatten_for_logging``).
  """
  accumulated, totals, examples = None, None, []
  for local in batches:
    out = eval_fn(params, batch_stats, sharding.global_batch(local, mesh))
    if 'examples' in out:  # Two-class tasks: small splits, so one transfer per batch is cheap.
      examples.append(jax.device_get(out.pop('examples')))
    metrics = out.pop('metrics')
    accumulated = metrics if accumulated is None else accumulated.merge(metrics)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals or {})
  count = int(accumulated.loss.count)
  # Divided on the host in float64: top-1 is exactly correct / count.
  host = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(accumulated))
  means = {k: float(v) if count else 0.0 for k, v in host.compute().items()}
  result = {'count': count, 'loss': means['loss']}
  if kind == 'softmax':
    result['top1'] = means['correct1']
    result['top5'] = means['correct5']
  else:
    result['prec@1'] = means['correct1']
  if 'confusion' in totals:
    per_class = eval_metrics.from_confusion(totals['confusion'])
    if examples:
      real = np.concatenate([e['mask'] for e in examples]) > 0
      per_class['roc_auc'] = eval_metrics.roc_auc(
          np.concatenate([e['score'] for e in examples])[real],
          np.concatenate([e['label'] for e in examples])[real])
    result.update(eval_metrics.flatten_for_logging(per_class, class_names))
  return result
