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


def test_input_pipeline_benchmark_reports_every_figure():
  proc = subprocess.run(
      [sys.executable, '-m', 'benchmarks.input_pipeline', '--images', '6', '--size', '64',
       '--seconds', '1.2', '--rounds', '2', '--quality', '90', '--train_images_per_sec', '100'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  rates = ('a_decode_per_core', 'a_decode_resize_per_core', 'b_train_per_core',
           'b_train_no_ra_per_core', 'c_eval_per_core')
  assert all(r[k] > 0 for k in rates), r
  low, high = r['b_over_a_range']
  assert low - 1e-3 <= r['b_over_a'] <= high + 1e-3, r  # The median of the per-round ratios.
  assert r['b_over_a'] == pytest.approx(r['b_train_per_core'] / r['a_decode_per_core'], rel=0.5)
  assert r['cores_to_feed'] == pytest.approx(100 / r['b_train_per_core'], rel=1e-2)
  assert (r['images'], r['size'], r['quality'], r['randaugment']) == (6, 64, 90, [2, 15])


def test_input_pipeline_benchmark_files_are_as_dense_as_imagenet():
  """The default files average near ImageNet-1K's 113 KiB; quality 90 gives half (see the doc)."""
  from benchmarks.input_pipeline import make_jpegs  # pylint: disable=g-import-not-at-top
  dense, sparse = (sum(map(len, make_jpegs(20, quality=q))) / 20 / 1024 for q in (98, 90))
  assert 85 < dense < 130, dense
  assert sparse < 0.6 * dense, (sparse, dense)


def test_run_gpu_keeps_every_row_and_prints_the_table(tmp_path):
  """run_gpu.sh at a tiny size on the CPU: a row that fails (an unknown model) is recorded with its
  reason while the others run; every row is in this run's own results file; the table comes last
  with the ratio of ours to timm for the same case. Inference rows only: the train rows' scripts
  are run by test_ours/test_timm above."""
  out = tmp_path / 'out'
  (out / 'results-old.jsonl').parent.mkdir()
  (out / 'results-old.jsonl').write_text('{"stale": true}\n')
  env = dict(os.environ, JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='', OUT=str(out))
  proc = subprocess.run(
      ['bash', os.path.join(ROOT, 'benchmarks', 'run_gpu.sh'), '--cases',
       'coatnet_pico:coatnet_0_224:2,no_such_model:no_such_model:2', '--res', '64', '--dtype',
       'float32', '--steps', '1', '--warmup', '1', '--rows', 'inference', '--budget_s', '3000'],
      cwd='/', env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  files = sorted(p.name for p in out.iterdir())
  new = [f for f in files if f.startswith('results-') and f != 'results-old.jsonl']
  assert len(new) == 1 and 'bench.log' in files, files
  records = [json.loads(l) for l in (out / new[0]).read_text().splitlines()]
  assert [r['row'] for r in records] == [
      'ours coatnet_pico inference 2', 'timm coatnet_pico inference 2',
      'ours no_such_model inference 2', 'timm no_such_model inference 2']
  ours, peer = records[0], records[1]
  assert ours['impl'] == 'coatnet_jax' and ours['fold_bn'] is True and ours['img_per_s'] > 0
  assert peer['impl'] == 'timm' and peer['model'] == 'coatnet_0_224' and peer['img_per_s'] > 0
  assert all(r['failed'].startswith('exit ') for r in records[2:]), records[2:]
  table = proc.stdout[proc.stdout.index('| row |'):]
  ratio = ours['img_per_s'] / peer['img_per_s']
  assert f'| ours coatnet_pico inference 2 | {ours["img_per_s"]:.0f} |' in table
  assert f'{ratio:.2f}x (timm)' in table, table
  assert table.count('failed: exit') == 2, table
  assert 'Unknown model' in (out / 'bench.log').read_text()
