"""BatchNorm population statistics recomputed from training batches, for evaluation at any run length.

BatchNorm's running averages at momentum m still hold m**t of their initial values after t steps:
0.99**150 = 22% after a short run on a small dataset, so evaluation normalised with wrong
statistics. With ``config.batchnorm_batches = N`` > 0 the trainer instead sets every BatchNorm's
mean and variance, before each evaluation and each save (so the final checkpoint, ``evaluate``
and exports carry them), to the population mean and variance of that layer's inputs over N
batches of the train split, whatever the momentum:

  mean = average over the N batches of the batch means
  var  = average over the N batches of (batch variance + batch mean**2) - mean**2

which is the exact (biased) variance over all N x B examples and positions, since the batches are
equal in size. Each batch passes through the network in train mode (the batch statistics the
weights were trained with, "precise BN", Wu & Johnson 2021) without stochastic depth (as in
evaluation). The batches are the train split through the EVAL transform, shuffled
(``input_pipeline.batchnorm_iterator``): the statistics are those of the inputs evaluation will
see (FixRes, Touvron et al. 2019: train-time crops change activation statistics), with the mix
of examples of a training batch. Parameters are untouched and the train step never reads the
running averages, so training, and a resumed run, go on exactly as without it. The state has one
set of statistics, those of ``params``; an EMA model's eval uses them too. A preemption save keeps
the running averages (the run resumes and recomputes before its next eval).
"""

import flax
import jax
import jax.numpy as jnp

from coatnet_jax import input_pipeline
from coatnet_jax import sharding
from coatnet_jax import steps


def _pair_sums(stats):
  """{..., 'mean': m, 'var': v} per BatchNorm -> the same tree holding (m, v + m**2)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(stats))
  out = {}
  for path, value in flat.items():
    if path[-1] == 'var':
      mean = flat[path[:-1] + ('mean',)]
      out[path] = value.astype(jnp.float32) + jnp.square(mean.astype(jnp.float32))
    else:
      out[path] = value.astype(jnp.float32)
  return flax.traverse_util.unflatten_dict(out)


def make_accumulate_step(config, model):
  """(params, sums, batch) -> sums + this batch's (mean, var + mean**2) of every BatchNorm.

  ``model`` must be built with ``bn_momentum=0`` (its running averages after one train-mode call
  are then exactly the batch's statistics) and no stochastic depth: ``steps.build_model`` of
  ``recalibration_config(config)``.
  """
  dtype = steps.dtype_of(config.model.dtype)

  def step(params, sums, batch):
    _, new = model.apply({'params': params, 'batch_stats': jax.tree.map(jnp.zeros_like, sums)},
                         steps.normalize(batch['image'], dtype), train=True,
                         mutable=['batch_stats'])
    return jax.tree.map(jnp.add, sums, _pair_sums(new['batch_stats']))

  return step


def _zeros(like):
  return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), like)


def finish(sums, num_batches: int):
  """Accumulated sums of N batches -> {'mean': population mean, 'var': population variance}."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(sums))
  out = {}
  for path, value in flat.items():
    if path[-1] == 'mean':
      out[path] = value / num_batches
    else:
      mean = flat[path[:-1] + ('mean',)] / num_batches
      out[path] = jnp.maximum(value / num_batches - jnp.square(mean), 0.0)
  return flax.traverse_util.unflatten_dict(out)


def recalibration_config(config):
  """A copy of ``config`` whose model keeps batch statistics as they are and drops no path."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.model.switches.bn_momentum = 0.0
    c.model.drop_path_rate = 0.0
  return c


class Recalibrator:
  """``recalibrator(params) -> batch_stats``: the population statistics of ``params`` over the
  first ``config.batchnorm_batches`` batches of ``input_pipeline.batchnorm_iterator`` (the same
  batches at every call, so a resumed run recomputes what the uninterrupted run did), jitted over
  the trainer's mesh with the state's shardings (BatchNorm statistics of the global batch)."""

  def __init__(self, config, model, mesh, state_shardings, process_index=0, process_count=1):
    self._config, self._mesh = config, mesh
    self._where = (process_index, process_count)
    self._num_batches = int(config.batchnorm_batches)
    self._step = jax.jit(make_accumulate_step(config, model),
                         in_shardings=(state_shardings.params, state_shardings.batch_stats,
                                       sharding.batch_sharding(mesh)),
                         out_shardings=state_shardings.batch_stats, donate_argnums=(1,))
    self._finish = jax.jit(finish, static_argnums=(1,), out_shardings=state_shardings.batch_stats)
    self._zeros = jax.jit(_zeros, out_shardings=state_shardings.batch_stats)

  def __call__(self, params, like):
    """Population statistics for ``params``; ``like`` is the state's batch_stats (its tree)."""
    sums = self._zeros(like)
    batches = input_pipeline.batchnorm_iterator(
        self._config.data, self._config.batch_size, seed=self._config.seed,
        process_index=self._where[0], process_count=self._where[1])
    for _ in range(self._num_batches):
      sums = self._step(params, sums, sharding.global_batch(next(batches), self._mesh))
    return self._finish(sums, self._num_batches)
