"""The recipe configs say what the paper's Table 10 says and build the model and optimizer.

The big models are only traced (``jax.eval_shape``), never run.
"""

import importlib
import json
import math

import jax
import pytest

from coatnet_jax import models, optim
from coatnet_jax import steps as steps_lib
from configs import common

IN1K_TRAIN = 1_281_167


def _config(module, arg=None):
  return importlib.import_module(f'configs.{module}').get_config(arg)


@pytest.mark.parametrize('variant,rate', [('coatnet_0', 0.2), ('coatnet_1', 0.3),
                                          ('coatnet_2', 0.5), ('coatnet_3', 0.7)])
def test_in1k_recipe(variant, rate):
  c = _config('in1k', f'variant={variant}')
  assert (c.model.name, c.model.drop_path_rate) == (variant, rate)
  assert (c.batch_size, c.num_epochs, c.optim.lr, c.optim.min_lr) == (4096, 300, 1e-3, 1e-5)
  assert (c.optim.schedule, c.optim.warmup_steps, c.optim.weight_decay) == ('cosine', 10_000, 0.05)
  assert (c.loss.kind, c.loss.label_smoothing, c.loss.mixup_alpha) == ('softmax', 0.1, 0.8)
  assert (c.data.randaugment.num_layers, c.data.randaugment.magnitude) == (2, 15)
  assert c.optim.clip_norm == 1.0 and c.ema.decay == 0.0
  steps = steps_lib.total_steps(c, IN1K_TRAIN)
  assert steps == 300 * IN1K_TRAIN // 4096
  schedule, _ = steps_lib.build_optimizer(c, IN1K_TRAIN)
  assert math.isclose(float(schedule(10_000)), 1e-3, rel_tol=1e-6)
  assert math.isclose(float(schedule(steps)), 1e-5, rel_tol=1e-4)


@pytest.mark.parametrize('variant,rate', [('coatnet_2', 0.3), ('coatnet_3', 0.5),
                                          ('coatnet_4', 0.7)])
def test_in21k_recipe(variant, rate):
  c = _config('in21k_pretrain', f'variant={variant}')
  assert (c.model.name, c.model.drop_path_rate, c.num_epochs) == (variant, rate, 90)
  assert (c.optim.schedule, c.optim.warmup_epochs, c.optim.weight_decay) == ('linear', 5, 0.01)
  assert (c.loss.kind, c.loss.label_smoothing, c.loss.mixup_alpha) == ('sigmoid', 1e-4, 0.0)
  assert c.data.randaugment.num_layers == 0
  assert _config('in21k_pretrain', f'variant={variant},ra').data.randaugment.magnitude == 5
  train_size = 13_000_000
  schedule, _ = steps_lib.build_optimizer(c, train_size)
  warm = 5 * (train_size // 4096)
  assert math.isclose(float(schedule(warm // 2)), 0.5e-3, rel_tol=1e-3)
  assert math.isclose(float(schedule(steps_lib.total_steps(c, train_size))), 1e-5, rel_tol=1e-4)


@pytest.mark.parametrize('variant,lr,rate', [('coatnet_3', 1e-3, 0.0), ('coatnet_4', 5e-4, 0.1),
                                             ('coatnet_5', 5e-4, 0.0)])
def test_jft_recipe(variant, lr, rate):
  c = _config('jft_pretrain', f'variant={variant}')
  assert (c.model.name, c.optim.lr, c.model.drop_path_rate) == (variant, lr, rate)
  assert (c.num_epochs, c.optim.warmup_steps, c.optim.schedule) == (14, 20_000, 'linear')
  assert (c.loss.kind, c.data.randaugment.num_layers, c.data.randaugment.magnitude) == (
      'sigmoid', 2, 5)


def test_unknown_variant_and_argument_are_errors():
  with pytest.raises(ValueError):
    _config('in1k', 'variant=coatnet_4')
  with pytest.raises(ValueError):
    _config('in1k', 'size=big')


def test_coatnet_0_state_traces_with_paper_size():
  """The full train state of the in1k recipe, traced: parameter count and the decay mask."""
  c = _config('in1k', 'variant=coatnet_0')
  model = steps_lib.build_model(c, 1000)
  _, tx = steps_lib.build_optimizer(c, IN1K_TRAIN)
  state = jax.eval_shape(steps_lib.make_init_fn(c, model, tx))
  n = sum(x.size for x in jax.tree.leaves(state.params))
  assert abs(n - models.PAPER_PARAMS['coatnet_0']) / models.PAPER_PARAMS['coatnet_0'] < 0.05
  mask = optim.weight_decay_mask(state.params, c.optim.no_decay)
  no_decay = [optim.path_str(p) for p, m in jax.tree_util.tree_leaves_with_path(mask) if not m]
  assert sum(p.endswith('relative_bias') for p in no_decay) == 7  # One table per attention block.
  assert state.ema_params is None


def test_runlocal_shrinks_but_keeps_the_recipe():
  c = _config('in1k', 'variant=coatnet_2,runlocal')
  assert c.model.name == 'coatnet_pico' and c.total_steps == 20
  assert c.optim.weight_decay == 0.05 and c.loss.mixup_alpha == 0.8


def test_a_saved_config_reads_back_over_the_base_defaults():
  """An older run's saved config (a field missing) still builds: the base config fills the gap."""
  saved = json.loads(_config('quickstart').to_json_best_effort())
  del saved['model']['remat'], saved['optim']['b2']
  c = common.with_defaults(saved)
  assert (c.model.remat, c.optim.b2) == ('none', 0.999)
  assert (c.model.name, c.model.dtype, c.data.name) == ('coatnet_pico', 'float32', 'digits')


def test_a_config_missing_a_field_is_named():
  from coatnet_jax import config_checks  # pylint: disable=g-import-not-at-top
  c = _config('quickstart')
  assert config_checks.missing_fields(c) == []
  del c.optim['b2']
  del c.loss['label_smoothing']
  problems = config_checks.missing_fields(c)
  assert [p.split(' is missing')[0] for p in problems] == [
      'config field loss.label_smoothing', 'config field optim.b2']
  assert all('get_base_config()' in p for p in problems)
