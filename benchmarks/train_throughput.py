r"""Img/s, MFU, peak memory and compile time of THIS project's train or inference step, one device.

  python3 benchmarks/train_throughput.py --variant coatnet_0 --batch 256 --res 224 \
      --dtype bfloat16 --steps 20 --warmup 5 [--mode inference [--no_fold]] [--form paper]

The train step is the trainer's own (``steps.make_train_step``) with the base config's AdamW,
clipping and loss, jitted with the trainer's shardings on a one-device mesh and a donated state.
The inference step is what ``evaluate``/``export`` run: the forward pass to class probabilities with
BatchNorm folded into the convolutions (``--no_fold``: the unfolded model), from the model's
variables alone (no optimizer state is built). ``--form timm`` (the default) is timm's
coatnet_N_224 form (``TIMM_OPTIONS``), like for like with ``timm_peer.py``; ``paper`` the paper's.
The batch is synthetic uint8 images and int labels already on the device, so this measures the
step, not the input pipeline. No TensorFlow is imported (checked at the end);
``ml_collections`` is needed (configs and ``train`` import it). The last line is one JSON object.

MFU = img/s x FLOPs per image / the device's peak (``metrics.PEAK_FLOPS``, dense bf16 vendor
figures), with FLOPs per image = 2 x counted MACs (x 3 for training); omitted on unknown devices.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

if __name__ == '__main__':  # `python benchmarks/train_throughput.py` from anywhere.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp

from configs import common
from coatnet_jax import cost
from coatnet_jax import metrics
from coatnet_jax import models
from coatnet_jax import sharding
from coatnet_jax import steps as steps_lib


def make_config(variant: str, batch: int, res: int, dtype: str, form: str = 'paper'):
  """The base config as the recipes train it, minus regularisers timm's peer does not run."""
  c = common.get_base_config()
  if form == 'timm':
    c.model.switches.update(dataclasses.asdict(models.TIMM_OPTIONS))
  c.model.name, c.model.dtype, c.model.drop_path_rate = variant, dtype, 0.0
  c.data.image_size, c.batch_size, c.eval_batch_size = res, batch, batch
  c.total_steps = 10_000
  c.loss.label_smoothing = 0.0
  c.mesh.data, c.mesh.fsdp = 1, 1
  return c


def peak_memory_bytes():
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get('peak_bytes_in_use')


def run(variant='coatnet_0', batch=256, res=224, dtype='bfloat16', steps=20, warmup=5,
        mode='train', num_classes=1000, form='timm', fold=True) -> dict:
  config = make_config(variant, batch, res, dtype, form)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  model = steps_lib.build_model(config, num_classes)
  bs = sharding.batch_sharding(mesh)
  k1, k2 = jax.random.split(jax.random.key(0))
  batch_data = jax.device_put({
      'image': jax.random.randint(k1, (batch, res, res, 3), 0, 256, jnp.int32).astype(jnp.uint8),
      'label': jax.random.randint(k2, (batch,), 0, num_classes, jnp.int32)}, bs)
  rep = sharding.replicated(mesh)
  t0 = time.perf_counter()
  if mode == 'train':
    schedule, tx = steps_lib.build_optimizer(config, train_size=batch * 1000)
    init_fn = steps_lib.make_init_fn(config, model, tx)
    shardings = sharding.tree_shardings(jax.eval_shape(init_fn), mesh, config.sharding)
    state = jax.jit(init_fn, out_shardings=shardings)()
    t0 = time.perf_counter()
    step = steps_lib.jit_train_step(config, model, tx, schedule, num_classes, mesh,
                                shardings).lower(state, batch_data).compile()
    def one(s):
      return step(s, batch_data)
  else:  # The model's variables only: no optimizer state, nothing donated.
    compute_dtype = steps_lib.dtype_of(dtype)
    state = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, res, res, 3),
                                                                    compute_dtype)),
                    out_shardings=rep)()
    net = model
    if fold:
      net = models.folded_model(model)
      state = jax.jit(lambda v: models.fold_batchnorm(model, v), out_shardings=rep)(state)

    def forward(variables, images):
      logits = net.apply(variables, steps_lib.normalize(images, compute_dtype), train=False)
      return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    t0 = time.perf_counter()
    step = jax.jit(forward, out_shardings=rep).lower(state, batch_data['image']).compile()
    def one(s):
      return s, step(s, batch_data['image'])
  compile_s = time.perf_counter() - t0

  for _ in range(warmup):
    state, out = one(state)
  jax.block_until_ready((state, out))
  t0 = time.perf_counter()
  for _ in range(steps):
    state, out = one(state)
  jax.block_until_ready((state, out))
  elapsed = time.perf_counter() - t0

  img_per_s = batch * steps / elapsed
  device = jax.devices()[0]
  peak = metrics.peak_flops(device.device_kind)
  flops = 2 * cost.model_macs(model, res) * (3 if mode == 'train' else 1)
  mem = peak_memory_bytes()
  return {
      'impl': 'coatnet_jax', 'model': variant, 'mode': mode, 'batch': batch, 'res': res,
      'form': form, 'fold_bn': bool(fold) if mode == 'inference' else None,
      'dtype': dtype, 'steps': steps, 'img_per_s': img_per_s,
      'step_ms': 1e3 * elapsed / steps, 'gflops_per_img': flops / 1e9,
      'mfu': img_per_s * flops / peak if peak else None,
      'peak_mem_gib': mem / 2**30 if mem is not None else None,
      'compile_s': compile_s, 'device': device.device_kind, 'jax': jax.__version__,
      'tensorflow_imported': 'tensorflow' in sys.modules}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--variant', default='coatnet_0')
  p.add_argument('--batch', type=int, default=256)
  p.add_argument('--res', type=int, default=224)
  p.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'])
  p.add_argument('--steps', type=int, default=20)
  p.add_argument('--warmup', type=int, default=5)
  p.add_argument('--mode', default='train', choices=['train', 'inference'])
  p.add_argument('--num_classes', type=int, default=1000)
  p.add_argument('--form', default='timm', choices=['timm', 'paper'])
  p.add_argument('--no_fold', action='store_true', help='inference without BatchNorm folding')
  a = p.parse_args(argv)
  result = run(a.variant, a.batch, a.res, a.dtype, a.steps, a.warmup, a.mode, a.num_classes,
               a.form, not a.no_fold)
  assert 'tensorflow' not in sys.modules, 'The benchmark path imported TensorFlow.'
  print(json.dumps(result))


if __name__ == '__main__':
  main()
