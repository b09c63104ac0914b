"""Parity with an independent implementation: timm's CoAtNets, converted both ways.

timm builds the model with random weights; every tensor that a zero or identity initialisation
would hide (BatchNorm statistics, norm affines, relative-bias tables, the relative-position MLPs,
layer scales) is randomised too, so a wrong mapping or layout cannot pass. Eval-mode float32
logits must agree to 1e-4 of their scale. timm's own models (rw, rmlp, bn) run at a small
non-square size that keeps timm's size rules (multiples of 32), and coatnet_rmlp_2_rw_384 at 384;
the largest layouts are checked key by key and shape by shape (``jax.eval_shape``, torch's meta
device), since their switches are those of smaller models that run.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coatnet_jax import convert

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')

SMALL = (64, 96)  # S3 4x6, S4 2x3: non-square, and fast.
# Run forward: every switch set of convert.TIMM_MODELS (coatnet_0_224 and coatnet_2_224 below).
FORWARD = ['coatnet_pico_rw_224', 'coatnet_nano_rw_224', 'coatnet_rmlp_nano_rw_224',
           'coatnet_0_rw_224', 'coatnet_bn_0_rw_224', 'coatnet_rmlp_0_rw_224', 'coatnet_1_rw_224',
           'coatnet_rmlp_1_rw_224', 'coatnet_rmlp_1_rw2_224', 'coatnet_2_rw_224',
           'coatnet_rmlp_2_rw_384']
# Keys and shapes only: the CoAtNet-3 and larger layouts, and models whose architecture runs above
# (coatnet_rmlp_2_rw_224 is coatnet_rmlp_2_rw_384's; coatnet_1_224 has coatnet_0_224's switches).
KEYS_AND_SHAPES = ['coatnet_rmlp_2_rw_224', 'coatnet_1_224', 'coatnet_3_rw_224',
                   'coatnet_rmlp_3_rw_224', 'coatnet_3_224', 'coatnet_4_224', 'coatnet_5_224']


def _randomised_timm_model(name, seed, img_size=224):
  torch.manual_seed(seed)
  model = timm.create_model(name, pretrained=False, num_classes=17, img_size=img_size).eval()
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
      elif key.endswith('.gamma'):  # layer scales start at 1e-6, which would hide the branches
        tensor.copy_(1.0 + 0.2 * torch.randn_like(tensor))
      elif 'rel_pos.mlp' in key:  # a bias of a few units that varies with the offset
        fan_in = tensor.shape[-1] if tensor.ndim == 2 else 1
        tensor.copy_(2.0 * torch.randn_like(tensor) / fan_in ** 0.5)
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
    convert.from_timm({}, 'coatnet_9_rw_224')
  state = {k: v.numpy() for k, v in timm.create_model('coatnet_0_224').state_dict().items()}
  del state['stages.2.blocks.0.attn.rel_pos.relative_position_bias_table']
  with pytest.raises(ValueError, match='relative_position_bias_table'):
    convert.from_timm(state, 'coatnet_0_224')


def _state(timm_model):
  return {k: v.numpy() for k, v in timm_model.state_dict().items()}


@pytest.mark.parametrize('name', FORWARD)
def test_timm_models_match_and_round_trip(name):
  size = (384, 384) if name.endswith('_384') else SMALL
  timm_model = _randomised_timm_model(name, 0, size)
  images = np.random.default_rng(1).normal(size=(2,) + size + (3,)).astype(np.float32)
  timm_images = torch.from_numpy(convert.timm_input(images, name))  # rw: mean = std = 0.5
  with torch.no_grad():
    want_features = timm_model.stages(timm_model.stem(timm_images)).numpy().transpose(0, 2, 3, 1)
    want = timm_model(timm_images).numpy()
  state = _state(timm_model)
  model, variables = convert.from_timm(state, name, image_size=size)
  got, inter = model.apply(variables, jnp.asarray(images), train=False, mutable=['intermediates'])
  got, got_features = np.asarray(got), np.asarray(inter['intermediates']['stage4'][0])
  feature_scale = np.abs(want_features).max()
  # The images move the S4 features by 10x the bar at least (random rw models respond weakly:
  # 0.7% of the scale for coatnet_1_rw), so a wrong image path cannot pass.
  assert np.abs(want_features[0] - want_features[1]).max() > 1e-3 * feature_scale
  features_err = np.abs(got_features - want_features).max() / feature_scale
  logits_err = np.abs(got - want).max() / np.abs(want).max()
  print(f'{name} at {size[0]}x{size[1]}: max|diff|/max|.| features {features_err:.1e} '
        f'logits {logits_err:.1e}')
  assert features_err < 1e-4 and logits_err < 1e-4

  # timm -> ours -> timm and ours -> timm -> ours are exact.
  back = convert.to_timm(variables, name)
  assert back.keys() == state.keys()
  for k, v in state.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  _, again = convert.from_timm(back, name, image_size=size)
  flat, flat_again = (flax.traverse_util.flatten_dict(v) for v in (variables, again))
  assert flat.keys() == flat_again.keys()
  for k, v in flat.items():
    np.testing.assert_array_equal(np.asarray(flat_again[k]), np.asarray(v), err_msg=str(k))

  # What to_timm writes loads into a fresh timm model with strict=True and gives our logits.
  fresh = timm.create_model(name, pretrained=False, num_classes=17, img_size=size).eval()
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
  with torch.no_grad():
    reloaded = fresh(timm_images).numpy()
  assert np.abs(reloaded - got).max() < 1e-4 * np.abs(want).max()


@pytest.mark.parametrize('name', KEYS_AND_SHAPES)
def test_large_timm_models_map_every_key_and_shape(name):
  with torch.device('meta'):
    timm_model = timm.create_model(name, pretrained=False, num_classes=17)
  want = {k: tuple(v.shape) for k, v in timm_model.state_dict().items()}
  model = convert.timm_model(name, 17)
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  ours = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  got = jax.eval_shape(lambda v: convert.to_timm(v, name), ours)
  assert {k: tuple(v.shape) for k, v in got.items()} == want


def test_the_size_of_the_tables_is_checked_and_named():
  state = _state(_randomised_timm_model('coatnet_pico_rw_224', 0, SMALL))
  with pytest.raises(ValueError, match=r'relative_position_bias_table .*image_size='):
    convert.from_timm(state, 'coatnet_pico_rw_224')  # made at 64x96, read as 224
  with pytest.raises(ValueError, match='divisible by 32'):
    convert.from_timm(state, 'coatnet_pico_rw_224', image_size=(64, 100))
  del state['stages.1.blocks.0.conv1_1x1.weight']
  with pytest.raises(ValueError, match=r'missing tensor stages\.1\.blocks\.0\.conv1_1x1\.weight'):
    convert.from_timm(state, 'coatnet_pico_rw_224', image_size=SMALL)
