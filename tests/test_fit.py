"""The fit tool: FSDP shrinks CoAtNet-5/6/7 train states, and a real AOT compile reports memory.

Both run in a subprocess with 8 fake CPU devices (the device count is fixed when JAX starts).
The big variants are only ever traced (``jax.eval_shape``) and sharded, never compiled or built.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FSDP = (1, 2, 4, 8)
# Replicated leaves (BatchNorm statistics, biases, norms, relative-bias tables, small kernels,
# step and rng) may be at most this fraction of the whole train state.
MAX_REPLICATED_FRACTION = 0.005


def _run(code: str, *args, timeout=1200) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, *(['-c', code] if code else []), *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


_SHRINK = textwrap.dedent("""
    import json
    import jax
    from configs import jft_pretrain
    from coatnet_jax import sharding
    from coatnet_jax.tools import fit
    out = {}
    for variant in ('coatnet_5', 'coatnet_6', 'coatnet_7'):
      c = jft_pretrain.get_config('variant=coatnet_5')
      c.model.name, c.ema.decay = variant, 0.9999  # EMA on: params + 2 Adam moments + EMA.
      state = None
      for k in (1, 2, 4, 8):
        mesh = sharding.make_mesh({'data': 8 // k, 'fsdp': k})
        if state is None:
          *_, state, _ = fit.abstract_state(c, mesh, 18291, 10**8)
        sh = sharding.tree_shardings(state, mesh, c.sharding)
        replicated = [(a, s) for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(sh))
                      if all(x is None for x in s.spec)]
        out[f'{variant}/{k}'] = {
            'per_device': fit.bytes_per_device(state, sh),
            'replicated': sum(a.size * a.dtype.itemsize for a, _ in replicated),
            'total': sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state))}
    print(json.dumps(out))
""")


def test_fsdp_shrinks_big_train_states():
  out = json.loads(_run(_SHRINK).stdout.strip().splitlines()[-1])
  for variant in ('coatnet_5', 'coatnet_6', 'coatnet_7'):
    one = out[f'{variant}/1']
    assert one['per_device'] == one['total']  # fsdp=1 is plain data parallelism: all replicated.
    for k in FSDP[1:]:
      r = out[f'{variant}/{k}']
      assert r['total'] == one['total']
      frac = r['replicated'] / r['total']
      assert frac <= MAX_REPLICATED_FRACTION, (variant, k, frac)
      # Exactly: replicated leaves whole, every other leaf split k ways.
      assert r['per_device'] == r['replicated'] + (r['total'] - r['replicated']) // k
      # Hence within (k - 1) * frac (< 3.5% at fsdp=8) of the ideal total / k.
      ideal = one['per_device'] / k
      assert ideal <= r['per_device'] <= ideal * (1 + (k - 1) * MAX_REPLICATED_FRACTION), (
          variant, k, r['per_device'] / ideal)


_COMPILE = textwrap.dedent("""
    import json
    import jax.numpy as jnp
    from configs import quickstart
    from coatnet_jax import sharding
    from coatnet_jax.tools import fit
    c = quickstart.get_config()
    c.sharding.min_size = 1024  # coatnet_pico is small: shard most of it anyway.
    out = {}
    for data, fsdp in ((8, 1), (2, 4)):
      mesh = sharding.make_mesh({'data': data, 'fsdp': fsdp})
      *_, state, sh = fit.abstract_state(c, mesh, 10, 1438)
      out[fsdp] = fit.bytes_per_device(state, sh)
    print(json.dumps(out))
""")


def test_aot_compile_reports_per_device_memory():
  """The CLI on coatnet_pico, 32 px, mesh data=2,fsdp=4: one real compile (~50 s on 2 cores)."""
  abstract = {int(k): v for k, v in json.loads(
      _run(_COMPILE).stdout.strip().splitlines()[-1]).items()}
  proc = _run(None, '-m', 'coatnet_jax.tools.fit', '--config', 'configs/quickstart.py',
              '--mesh', 'data=2,fsdp=4', '--batch_size', '16',
              '--config.sharding.min_size=1024', '--accelerator', 'v5e')
  rows = dict(re.findall(r'^  (\S.*?)\s+\d+\.\d+\s+([\d,]+)$', proc.stdout, re.M))
  rows = {k: int(v.replace(',', '')) for k, v in rows.items()}
  for name in ('arguments (state + batch)', 'outputs', 'temporaries', 'total',
               'of which train state'):
    assert rows[name] > 0, (name, proc.stdout)
  batch_bytes = (16 * 32 * 32 * 3 * 1 + 16 * 4) // 8  # uint8 images + int32 labels, 8 ways.
  # memory_analysis() is per device: its argument bytes are this device's shard of the state
  # plus its slice of the batch, exactly.
  assert rows['of which train state'] == abstract[4]
  assert rows['arguments (state + batch)'] == abstract[4] + batch_bytes
  assert rows['arguments (state + batch)'] < abstract[1]  # fsdp=4 holds less than fsdp=1.
  assert abstract[4] < abstract[1] / 2
  assert re.search(r'^fits v5e: yes \(\d+\.\d GiB of 16 GiB\)$', proc.stdout, re.M), proc.stdout
  assert 'libtpu' not in proc.stdout  # No --tpu_topology asked.
