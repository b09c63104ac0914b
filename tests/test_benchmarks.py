"""Both benchmark scripts run end to end on the CPU at a tiny size and print their JSON line.

The real numbers need a GPU (benchmarks/run_gpu.sh); this checks that the scripts work, report
every field, and that this project's benchmark path imports no TensorFlow.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ('impl', 'model', 'mode', 'batch', 'res', 'img_per_s', 'step_ms', 'gflops_per_img',
          'mfu', 'peak_mem_gib', 'compile_s', 'device')


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  """A persistent compilation cache shared by the runs: the second reuses the init's compile."""
  return str(tmp_path_factory.mktemp('xla_cache'))


def _run(script, *args, cache='') -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='',
             JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='1')
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', script), *args],
                        cwd='/', env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  for field in FIELDS:
    assert field in result, (field, result)
  assert result['img_per_s'] > 0 and result['step_ms'] > 0 and result['compile_s'] > 0
  assert result['gflops_per_img'] > 0
  assert result['mfu'] is None and result['peak_mem_gib'] is None  # Unknown on the CPU.
  return result


@pytest.mark.parametrize('mode', ['train', 'inference'])
def test_ours(mode, cache_dir):
  r = _run('train_throughput.py', '--variant', 'coatnet_pico', '--batch', '8', '--res', '32',
           '--dtype', 'float32', '--steps', '2', '--warmup', '1', '--mode', mode, cache=cache_dir)
  assert (r['impl'], r['model'], r['mode'], r['batch']) == ('coatnet_jax', 'coatnet_pico', mode, 8)
  assert r['tensorflow_imported'] is False


@pytest.mark.parametrize('mode', ['train', 'inference'])
def test_timm(mode):
  r = _run('timm_peer.py', '--model', 'coatnet_0_224', '--res', '64', '--batch', '2',
           '--steps', '1', '--warmup', '1', '--mode', mode)
  assert (r['impl'], r['model'], r['mode'], r['res']) == ('timm', 'coatnet_0_224', mode, 64)
  # Training counts forward + backward: 3x the forward FLOPs of the same model and size.
  assert 0.5 < r['gflops_per_img'] / (3 if mode == 'train' else 1) < 1.0  # ~0.72 at 64 px.
