"""The switches added for timm's models leave earlier checkpoints valid, and the rel-pos MLP bias
equals a brute-force loop over every (query, key) pair."""

import dataclasses
import hashlib
import json

import jax
import numpy as np

from configs import common
from coatnet_jax import architecture
from coatnet_jax import models
from coatnet_jax.models import relpos

# The fields the architecture id hashed before timm's switches existed (ARCHITECTURE_VERSION 1).
V1_VARIANT = ('stem_width', 'stages', 'head_size', 'head_hidden')
V1_SWITCHES = ('mbconv_stride', 'pool', 'head_pre_logits', 'gelu_approximate', 'bn_epsilon',
               'bn_momentum', 'ln_epsilon', 'padding', 'stem_bias')


def _v1_id(name, switches, num_classes):
  variant, options = models.VARIANTS[name], models.Options(**switches)
  desc = {'variant': {f: getattr(variant, f) for f in V1_VARIANT},
          'switches': {f: getattr(options, f) for f in V1_SWITCHES},
          'num_classes': num_classes, 'version': 1}
  blob = json.dumps(desc, sort_keys=True, default=str).encode()
  return f'v1-{hashlib.sha256(blob).hexdigest()[:16]}'


def test_earlier_checkpoints_keep_their_architecture_id():
  for name, switches in [('coatnet_0', {}), ('coatnet_pico', {'pool': 'avg', 'bn_momentum': 0.9}),
                         ('coatnet_2', dataclasses.asdict(models.TIMM_OPTIONS))]:
    c = common.get_base_config()
    c.model.name = name
    c.model.switches.update(switches)
    assert architecture.architecture_id(c, 10) == _v1_id(name, switches, 10)
  c.model.switches.rel_pos = 'mlp'  # a new switch away from its default names another model
  assert architecture.architecture_id(c, 10) != _v1_id('coatnet_2', switches, 10)


def test_rel_pos_mlp_matches_a_brute_force_loop():
  height, width, heads, hidden = 3, 4, 2, 8
  module = relpos.RelPosMlp(heads, hidden)
  params = module.init(jax.random.key(0), height, width)['params']
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
  got = np.asarray(module.apply({'params': params}, height, width))
  assert got.shape == (heads, height * width, height * width) and got.dtype == np.float32

  w1, b1 = np.asarray(params['fc1']['kernel']), np.asarray(params['fc1']['bias'])
  w2, b2 = np.asarray(params['fc2']['kernel']), np.asarray(params['fc2']['bias'])
  want = np.zeros_like(got)
  for q in range(height * width):
    for k in range(height * width):
      offset = np.array([q // width - k // width, q % width - k % width], np.float64)
      coords = np.sign(offset) * np.log(1.0 + np.abs(offset))
      want[:, q, k] = np.maximum(coords @ w1 + b1, 0.0) @ w2 + b2
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_half_input_norm_sees_the_pixels_the_pipeline_normalised():
  from coatnet_jax import steps  # pylint: disable=g-import-not-at-top
  from coatnet_jax.models import coatnet  # pylint: disable=g-import-not-at-top
  assert coatnet.IMAGENET_MEAN_RGB == steps.MEAN_RGB
  assert coatnet.IMAGENET_STDDEV_RGB == steps.STDDEV_RGB
  pixels = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3)).astype(np.uint8)
  x = steps.normalize(pixels)
  # The stem's first conv sees pixels / 127.5 - 1: capture its input and stop there (cheap).
  model = models.get_model('coatnet_pico', 3, input_norm='half')
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  captured = {}

  class Stop(Exception):
    pass

  def grab(next_fun, args, kwargs, context):
    if context.module.name == 'stem_conv1' and context.method_name == '__call__':
      captured['x'] = np.asarray(args[0])
      raise Stop
    return next_fun(*args, **kwargs)

  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  with nn.intercept_methods(grab):
    try:
      model.apply(variables, x)
    except Stop:
      pass
  np.testing.assert_allclose(captured['x'], pixels / 127.5 - 1.0, atol=1e-5)
