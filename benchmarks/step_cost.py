r"""What XLA says a compiled step costs, without an accelerator: the CPU measure of progress.

  python -m benchmarks.step_cost --variant coatnet_0 --batch 8 --res 224 --dtype bfloat16 \
      --form timm [--remat none] [--modes train,inference,inference_folded]

For the trainer's own train step (``steps.make_train_step`` with the base config's AdamW,
clipping and loss, as ``train_throughput.py`` runs it) and for the inference forward pass
(unfolded, and with BatchNorm folded where the code has ``models.fold_batchnorm``), compiled from
abstract shapes only (nothing is initialised or run), it prints XLA's counted flops, bytes
accessed, the number of fusions in the optimised HLO, the temporary (non-argument, non-output)
memory and the compile time. ``--form timm`` builds ``TIMM_OPTIONS`` (like for like with timm's
coatnet_N_224); ``paper`` the paper's form. The last line is one JSON list.

These are ratios to compare before/after on the same machine, not speeds: on the CPU, XLA turns each
depthwise-convolution weight gradient into a dense convolution, so compare bytes and fusions rather
than flops (``shared/reference/performance.md``). Compile time is noisy on a shared machine.
"""

import argparse
import functools
import json
import re
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks import train_throughput
from coatnet_jax import models
from coatnet_jax import sharding
from coatnet_jax import steps as steps_lib


def make_config(variant, batch, res, dtype, form, remat):
  config = train_throughput.make_config(variant, batch, res, dtype, form)
  if 'remat' in config.model:  # Code before the field measures remat='none' only.
    config.model.remat = remat
  elif remat != 'none':
    raise SystemExit('error: this code has no config.model.remat; run with --remat none.')
  return config


def _cost(compiled) -> dict:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older jax: one dict per computation.
    analysis = analysis[0]
  memory = compiled.memory_analysis()
  hlo = compiled.as_text()
  return {'gflops': analysis.get('flops', 0.0) / 1e9,
          'gbytes_accessed': analysis.get('bytes accessed', 0.0) / 1e9,
          'fusions': len(re.findall(r'=\s*\S+\s+fusion\(', hlo)),
          'temp_gib': memory.temp_size_in_bytes / 2**30 if memory else None}


def measure(variant='coatnet_0', batch=8, res=224, dtype='bfloat16', form='timm', remat='none',
            modes=('train', 'inference'), num_classes=1000) -> list:
  config = make_config(variant, batch, res, dtype, form, remat)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  model = steps_lib.build_model(config, num_classes)
  bs = sharding.batch_sharding(mesh)
  images = jax.ShapeDtypeStruct((batch, res, res, 3), jnp.uint8, sharding=bs)
  compute_dtype = steps_lib.dtype_of(dtype)
  rows = []
  for mode in modes:
    t0 = time.perf_counter()
    if mode == 'train':
      schedule, tx = steps_lib.build_optimizer(config, train_size=batch * 1000)
      state = jax.eval_shape(steps_lib.make_init_fn(config, model, tx))
      shardings = sharding.tree_shardings(state, mesh, config.sharding)
      labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=bs)
      lowered = steps_lib.jit_train_step(config, model, tx, schedule, num_classes, mesh,
                                     shardings).lower(state, {'image': images, 'label': labels})
    else:
      folded = mode == 'inference_folded'
      if folded and not hasattr(models, 'fold_batchnorm'):
        continue  # Code before BatchNorm folding existed.
      net = models.folded_model(model) if folded else model
      dummy = jax.ShapeDtypeStruct((1, res, res, 3), compute_dtype)
      variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), dummy)
      if folded:
        variables = jax.eval_shape(functools.partial(models.fold_batchnorm, model), variables)

      def forward(variables, images, net=net):
        return net.apply(variables, steps_lib.normalize(images, compute_dtype), train=False)

      lowered = jax.jit(forward).lower(variables, images)
    compiled = lowered.compile()
    row = {'model': variant, 'form': form, 'mode': mode, 'batch': batch, 'res': res,
           'dtype': dtype, 'remat': remat, **_cost(compiled),
           'compile_s': time.perf_counter() - t0}
    rows.append(row)
    print(f"{variant} {form} {mode:16s} remat={remat:5s} {row['gflops']:8.1f} GFLOP "
          f"{row['gbytes_accessed']:7.2f} GB accessed {row['fusions']:6d} fusions "
          f"{row['temp_gib']:6.2f} GiB temp {row['compile_s']:6.1f} s compile", flush=True)
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--variant', default='coatnet_0')
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--res', type=int, default=224)
  p.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'])
  p.add_argument('--form', default='timm', choices=['timm', 'paper'])
  p.add_argument('--remat', default='none')
  p.add_argument('--modes', default='train,inference,inference_folded')
  p.add_argument('--num_classes', type=int, default=1000)
  a = p.parse_args(argv)
  rows = measure(a.variant, a.batch, a.res, a.dtype, a.form, a.remat, a.modes.split(','),
                 a.num_classes)
  assert 'tensorflow' not in sys.modules, 'The benchmark path imported TensorFlow.'
  print(json.dumps(rows))


if __name__ == '__main__':
  main()
