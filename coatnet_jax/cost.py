"""Counting multiply-adds (MACs) and parameters of a function or model, from shapes alone.

The paper reports "FLOPs" that are really multiply-adds of the convolutions and matrix products,
and MFU needs the same count of useful work per image. Both come from here: the function is traced
with ``jax.make_jaxpr`` (never compiled, so no backend fusion or rewrite changes the count) and
every ``conv_general_dilated`` and ``dot_general`` in the jaxpr, and in every sub-jaxpr (jit,
remat, custom derivatives, scan, while, cond), adds its multiply-adds. Elementwise work,
reductions, softmax and normalisation are not counted, as in the paper.

A ``scan`` body counts once per iteration; a ``while`` body counts once (its trip count is not
known from shapes); a ``cond`` counts its most expensive branch.
"""

import math
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

_ClosedJaxpr = jex_core.ClosedJaxpr
_Jaxpr = jex_core.Jaxpr


def _conv_macs(eqn) -> int:
  """Output elements x kernel window x input channels per group.

  ``dimension_numbers`` gives the axis roles: lhs (batch, feature, spatial...), rhs (out feature,
  in feature, spatial...), out (batch, feature, spatial...). The rhs in-feature size is the lhs
  feature size / ``feature_group_count``; with ``batch_group_count`` the groups split the batch
  instead (fewer output batch elements, each summing over all input channels), and the rhs
  in-feature size equals the lhs feature size. So in both cases every output element is a sum over
  rhs in-features x kernel window.
  """
  lhs, rhs = (v.aval.shape for v in eqn.invars)
  out = eqn.outvars[0].aval.shape
  dims = eqn.params['dimension_numbers']
  rhs_in = rhs[dims.rhs_spec[1]]
  window = math.prod(rhs[d] for d in dims.rhs_spec[2:])
  lhs_features = lhs[dims.lhs_spec[1]]
  groups = eqn.params['feature_group_count']
  assert rhs_in * groups == lhs_features, (lhs, rhs, dims, groups)
  return math.prod(out) * window * rhs_in


def _dot_macs(eqn) -> int:
  """Batch dims x lhs free dims x rhs free dims x contracting dims."""
  lhs, rhs = (v.aval.shape for v in eqn.invars)
  (_, rhs_contract), (_, rhs_batch) = eqn.params['dimension_numbers']
  rhs_free = math.prod(d for i, d in enumerate(rhs) if i not in (*rhs_contract, *rhs_batch))
  return math.prod(lhs) * rhs_free  # lhs = batch x lhs free x contracting.


def _sub_jaxprs(value) -> Iterator[_Jaxpr]:
  """Every jaxpr found in a param value, looking inside tuples and lists."""
  if isinstance(value, _ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, _Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _sub_jaxprs(item)


def _jaxpr_macs(jaxpr: _Jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      total += _conv_macs(eqn)
    elif name == 'dot_general':
      total += _dot_macs(eqn)
    elif name == 'cond':  # Only one branch runs.
      total += max(_jaxpr_macs(j) for j in _sub_jaxprs(eqn.params['branches']))
    else:
      inner = sum(_jaxpr_macs(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
      total += inner * (eqn.params['length'] if name == 'scan' else 1)
  return total


def count_macs(fn: Callable[..., Any], *args) -> int:
  """Multiply-adds of the convolutions and matrix products in ``fn(*args)``.

  Args:
    fn: a JAX-traceable function.
    *args: its arguments: arrays or ``jax.ShapeDtypeStruct``s (only shapes are used).

  Returns:
    The MAC count, from the traced jaxpr (nothing is compiled or run).
  """
  return _jaxpr_macs(jax.make_jaxpr(fn)(*args).jaxpr)


def _abstract_init(model, image_size: int, batch: int):
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  return images, variables


def model_macs(model, image_size: int, batch: int = 1) -> int:
  """MACs of an eval-mode forward pass of ``batch`` ``image_size``-square RGB images."""
  images, variables = _abstract_init(model, image_size, batch)
  variables = {k: v for k, v in variables.items() if k != 'intermediates'}
  return count_macs(lambda v, x: model.apply(v, x, train=False), variables, images)


def param_count(model, image_size: int = 224) -> int:
  """Number of parameters (the 'params' collection only; BatchNorm statistics are not counted)."""
  _, variables = _abstract_init(model, image_size, 1)
  return sum(math.prod(p.shape) for p in jax.tree.leaves(variables['params']))
