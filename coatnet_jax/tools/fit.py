r"""Fit before you pay: compile the train step ahead of time for a mesh and print its memory.

  python -m coatnet_jax.tools.fit --config configs/in1k.py:variant=coatnet_2 \
      --mesh data=1,fsdp=1 --batch_size 128 --accelerator h100-80gb
  python -m coatnet_jax.tools.fit --config configs/jft_pretrain.py:variant=coatnet_5 \
      --config.num_classes=18291 --mesh data=2,fsdp=4 --batch_size 64 --accelerator v5p

The train step (``steps.make_train_step``, the trainer's own) is lowered with the trainer's
shardings on fake CPU devices, one per mesh position, and compiled; XLA's memory analysis of the
compiled step is per device. Nothing is initialised and no dataset is read: the state comes from
``jax.eval_shape`` of the init function and the batch is a ``jax.ShapeDtypeStruct``.

Fake devices: the number of CPU devices is fixed when JAX starts its backend, so ``main`` sets
``jax_num_cpu_devices`` (and ``jax_platforms=cpu``, so a GPU machine also compiles for its CPUs)
before anything touches a device. Code that imports this module instead (tests) must start Python
with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` or set that config itself.

Argument (state + batch) bytes are exact for any backend. Temporaries are the CPU compiler's and
run high: CoAtNet-0, batch 32, bf16 gives 9.1 GiB here, while timm's GPU step needs about 3.7 GiB
per 32 images in all (shared/reference/performance.md). Treat a CPU "fits" as safe and a CPU "no"
as a prompt to check on the card or with ``--tpu_topology``.
With ``--tpu_topology v5e:2x2`` and libtpu installed, the step is also compiled for that TPU
topology (no TPU needed), whose figures are TPU's own. A full CoAtNet-2 step takes minutes to
compile on 2 CPU cores.
"""

import dataclasses
import math
import time

from coatnet_jax import cli  # pylint: disable=g-bad-import-order  (first: quiet start-up)
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from coatnet_jax import config_checks
from coatnet_jax import errors
from coatnet_jax import sharding
from coatnet_jax import steps

GiB = 2**30

# Memory per device in GiB (vendor spec sheets). On GPUs JAX preallocates 75% of it by default
# (XLA_PYTHON_CLIENT_MEM_FRACTION), so the verdict warns above that.
ACCELERATORS = {
    'h100-80gb': 80, 'h200': 141, 'a100-40gb': 40, 'a100-80gb': 80, 'l4': 24,
    'v4': 32, 'v5e': 16, 'v5p': 95, 'v6e': 32,
}
# (num_classes, train examples) of the datasets the configs name, so no dataset is needed here.
DATASETS = {'imagenet2012': (1000, 1_281_167), 'imagenet21k': (21_841, 13_048_677),
            'digits': (10, 1438)}

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'A configs/*.py file, optionally with ":ARGS"; --config.a.b=VALUE overrides.',
    lock_config=True)
_MESH = flags.DEFINE_string('mesh', 'data=1,fsdp=1', "Mesh sizes 'data=N,fsdp=M' (N*M fake "
                            'devices); replaces config.mesh.')
_BATCH = flags.DEFINE_integer('batch_size', None, 'Global batch; default config.batch_size.')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', None, 'Default: config.num_classes, else the '
                                    "dataset's (known: " + ', '.join(DATASETS) + ').')
_TRAIN_SIZE = flags.DEFINE_integer('train_size', 1_000_000, 'Train examples, for the schedule '
                                   'only, when the dataset is not known.')
_ACCELERATOR = flags.DEFINE_enum('accelerator', 'h100-80gb', list(ACCELERATORS),
                                 'Whose memory the verdict compares against.')
_TPU_TOPOLOGY = flags.DEFINE_string('tpu_topology', None, "Also compile for this TPU topology, "
                                    "e.g. 'v5e:2x2' (needs libtpu).")


def parse_mesh(text: str) -> dict:
  """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4}; a missing axis is 1."""
  sizes = {a: 1 for a in sharding.AXES}
  for item in filter(None, text.split(',')):
    key, _, value = item.partition('=')
    if key not in sizes or not value.isdigit() or int(value) < 1:
      raise ValueError(f"Bad --mesh item {item!r}; want 'data=N,fsdp=M' with N, M >= 1.")
    sizes[key] = int(value)
  return sizes


@dataclasses.dataclass
class Fit:
  """Per-device bytes of one compiled train step, and how long compiling took."""
  argument: int
  output: int
  alias: int  # Outputs written into donated arguments: counted once, not twice.
  temp: int
  code: int
  state: int  # The train state alone, from its shardings.
  compile_s: float

  @property
  def total(self) -> int:
    return self.argument + self.output - self.alias + self.temp + self.code


def dataset_info(config, num_classes=None, train_size=None):
  known = DATASETS.get(config.data.name, (None, None))
  num_classes = num_classes or config.num_classes or known[0]
  if not num_classes:
    raise ValueError(f'Unknown dataset {config.data.name!r}: pass --num_classes.')
  return num_classes, known[1] or train_size or 1_000_000


def abstract_state(config, mesh, num_classes: int, train_size: int):
  """(model, schedule, tx, abstract state, state shardings), as the trainer builds them."""
  model = steps.build_model(config, num_classes)
  schedule, tx = steps.build_optimizer(config, train_size)
  state = jax.eval_shape(steps.make_init_fn(config, model, tx))
  return model, schedule, tx, state, sharding.tree_shardings(state, mesh, config.sharding)


def bytes_per_device(tree, shardings) -> int:
  """Bytes one device holds of ``tree`` (abstract arrays) under ``shardings``."""
  return sum(math.prod(s.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize
             for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def compile_train_step(config, mesh, batch_size: int, num_classes: int, train_size: int) -> Fit:
  """Lowers and compiles the trainer's step for ``mesh``; returns its per-device memory."""
  model, schedule, tx, state, shardings = abstract_state(config, mesh, num_classes, train_size)
  batch = steps.abstract_batch(config, batch_size, num_classes, sharding.batch_sharding(mesh))
  state_in = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          state, shardings)
  step = steps.jit_train_step(config, model, tx, schedule, num_classes, mesh, shardings)
  t0 = time.perf_counter()
  m = step.lower(state_in, batch).compile().memory_analysis()
  compile_s = time.perf_counter() - t0
  return Fit(m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
             m.temp_size_in_bytes, m.generated_code_size_in_bytes,
             bytes_per_device(state, shardings), compile_s)


def verdict(total: int, accelerator: str) -> str:
  cap = ACCELERATORS[accelerator]
  line = (f'fits {accelerator}: {"yes" if total <= cap * GiB else "no"} '
          f'({total / GiB:.1f} GiB of {cap} GiB)')
  if not accelerator.startswith('v') and cap * GiB * 0.75 < total <= cap * GiB:
    line += ' -- above JAX\'s default 75% GPU preallocation: set XLA_PYTHON_CLIENT_MEM_FRACTION'
  return line


def report(fit: Fit, title: str, accelerator: str) -> str:
  rows = [('arguments (state + batch)', fit.argument), ('outputs', fit.output),
          ('aliased (donated, -)', fit.alias), ('temporaries', fit.temp),
          ('generated code', fit.code), ('total', fit.total),
          ('of which train state', fit.state)]
  lines = [title, f'  {"per device":28s} {"GiB":>9s} {"bytes":>15s}']
  lines += [f'  {name:28s} {b / GiB:9.3f} {b:15,d}' for name, b in rows]
  lines += [f'  compiled in {fit.compile_s:.1f} s', verdict(fit.total, accelerator)]
  return '\n'.join(lines)


def tpu_mesh(topology: str, mesh_sizes: dict):
  """A mesh over the devices of a named TPU topology, or None (said plainly) without libtpu."""
  try:
    import libtpu  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    print(f'TPU topology {topology}: libtpu is not installed, so no TPU compile was done '
          '(pip install libtpu, no TPU needed).')
    return None
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  topo = topologies.get_topology_desc(topology_name=topology, platform='tpu')
  return sharding.make_mesh(mesh_sizes, devices=topo.devices)


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  sizes = parse_mesh(_MESH.value)
  n = math.prod(sizes.values())
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', n)
  config = _CONFIG.value
  problems = config_checks.missing_fields(config)
  if problems:
    raise errors.UserError(*problems)
  batch_size = _BATCH.value or config.batch_size
  if batch_size % n:
    raise errors.UserError(f'Batch {batch_size} is not divisible by {n} devices.')
  num_classes, train_size = dataset_info(config, _NUM_CLASSES.value, _TRAIN_SIZE.value)
  what = (f'{config.model.name} train step, {config.data.image_size} px, global batch '
          f'{batch_size}, {config.model.dtype}, {num_classes} classes, mesh '
          f'data={sizes["data"]} fsdp={sizes["fsdp"]}')
  mesh = sharding.make_mesh(sizes, devices=jax.devices('cpu')[:n])
  fit = compile_train_step(config, mesh, batch_size, num_classes, train_size)
  print(report(fit, f'{what} ({n} fake CPU devices)', _ACCELERATOR.value))
  if _TPU_TOPOLOGY.value:
    mesh = tpu_mesh(_TPU_TOPOLOGY.value, sizes)
    if mesh is not None:
      fit = compile_train_step(config, mesh, batch_size, num_classes, train_size)
      accel = _TPU_TOPOLOGY.value.split(':')[0]
      print(report(fit, f'{what} (TPU {_TPU_TOPOLOGY.value})',
                   accel if accel in ACCELERATORS else _ACCELERATOR.value))


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  cli.run(main, flags_parser=cli.parse_config_flags)
