"""Parity with an independent implementation: timm's paper-config CoAtNets, converted.

timm builds the model with random weights; every tensor that a zero or identity initialisation
would hide (BatchNorm statistics, norm affines, relative-bias tables) is randomised too, so a
wrong mapping or layout cannot pass. Eval-mode float32 logits must agree to 1e-4 of their scale.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from coatnet_jax import convert

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')


def _randomised_timm_model(name, seed):
  torch.manual_seed(seed)
  model = timm.create_model(name, pretrained=False, num_classes=17).eval()
  with torch.no_grad():
    for key, tensor in model.state_dict().items():
      if key.endswith('running_var'):
        tensor.copy_(torch.rand_like(tensor) + 0.5)
      elif key.endswith('running_mean'):
        tensor.copy_(0.1 * torch.randn_like(tensor))
      elif 'norm' in key and key.endswith(('weight', 'bias')):
        tensor.copy_((1.0 if key.endswith('weight') else 0.0) + 0.2 * torch.randn_like(tensor))
      elif key.endswith('relative_position_bias_table'):
        tensor.copy_(torch.randn_like(tensor))
  return model


@pytest.mark.parametrize('name', ['coatnet_0_224', 'coatnet_2_224'])
def test_logits_match_timm(name):
  timm_model = _randomised_timm_model(name, seed=0)
  images = np.random.default_rng(1).normal(size=(2, 3, 224, 224)).astype(np.float32)
  with torch.no_grad():
    want_features = timm_model.forward_features(torch.from_numpy(images))
    want = timm_model.forward_head(want_features).numpy()
    want_features = want_features.numpy().transpose(0, 2, 3, 1)

  state = {k: v.numpy() for k, v in timm_model.state_dict().items()}
  model, variables = convert.from_timm(state, name)
  got, state_out = model.apply(variables, jnp.asarray(images.transpose(0, 2, 3, 1)), train=False,
                               mutable=['intermediates'])
  got, got_features = np.asarray(got), np.asarray(state_out['intermediates']['stage4'][0])

  assert got.dtype == np.float32 and got.shape == want.shape
  # The S4 features carry the image (a backbone bug cannot hide behind a bias-dominated head).
  feature_scale = np.abs(want_features).max()
  assert np.abs(want_features[0] - want_features[1]).max() > 0.02 * feature_scale
  print(name, 'features: max|diff| / max|feature| =',
        np.abs(got_features - want_features).max() / feature_scale)
  np.testing.assert_array_less(np.abs(got_features - want_features).max(), 1e-4 * feature_scale)

  scale = np.abs(want).max()
  print(name, 'logits: max|diff| / max|logit| =', np.abs(got - want).max() / scale)
  np.testing.assert_array_less(np.abs(got - want).max(), 1e-4 * scale)
  # Every BatchNorm's statistics were carried over.
  n_bn = sum(k.endswith('running_mean') for k in state)
  assert len(_flat(variables['batch_stats'])) == n_bn


def _flat(tree):
  if isinstance(tree, dict) and 'mean' in tree:
    return [tree]
  return [leaf for v in tree.values() for leaf in _flat(v)]


def test_unknown_model_and_broken_state_dict():
  with pytest.raises(ValueError, match='supported'):
    convert.from_timm({}, 'coatnet_0_rw_224')
  state = {k: v.numpy() for k, v in timm.create_model('coatnet_0_224').state_dict().items()}
  del state['stages.2.blocks.0.attn.rel_pos.relative_position_bias_table']
  with pytest.raises(ValueError, match='relative_bias'):
    convert.from_timm(state, 'coatnet_0_224')
