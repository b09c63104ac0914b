"""End-to-end tests of the trainer through its real entry points.

The slow parts (compiling) run in subprocesses: the 8-device run needs XLA_FLAGS before JAX starts,
and the main smoke test checks that the quickstart path never imports TensorFlow.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, env_extra=None, timeout=1800):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', **(env_extra or {}))
  env.pop('XLA_FLAGS', None)
  env.update(env_extra or {})
  proc = subprocess.run([sys.executable] + args, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return proc


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


# Runs main and reports whether TensorFlow got imported, after app.run's sys.exit.
_MAIN = ('import atexit, runpy, sys; '
         'atexit.register(lambda: print("TF_IMPORTED=%s" % ("tensorflow" in sys.modules))); '
         'sys.argv = ["main"] + sys.argv[1:]; '
         'runpy.run_module("coatnet_jax.main", run_name="__main__")')


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
  """One quickstart:smoke run through main (80 steps, checkpoints at 60 and 80)."""
  workdir = str(tmp_path_factory.mktemp('smoke'))
  cache = str(tmp_path_factory.mktemp('xla_cache'))
  args = ['-c', _MAIN, '--config', 'configs/quickstart.py:smoke', '--workdir', workdir,
          f'--config.compilation_cache_dir={cache}']
  proc = _run(args)
  return workdir, args, proc


def test_main_smoke_writes_workdir_and_no_tensorflow(smoke):
  workdir, _, proc = smoke
  assert 'TF_IMPORTED=False' in proc.stdout
  assert os.path.exists(os.path.join(workdir, 'config.json'))
  assert json.load(open(os.path.join(workdir, 'config.json')))['batch_size'] == 64
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['60', '80']
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  rows = _metrics(workdir)
  assert [r['step'] for r in rows if 'train/loss' in r] == [20, 40, 60, 80]
  evals = [r for r in rows if 'eval/top1' in r]
  assert len(evals) == 1 and evals[0]['step'] == 80
  assert evals[0]['eval/count'] == 359  # Every test digit exactly once (359 is prime).
  assert 'img/s' in proc.stderr and 'ETA' in proc.stderr and 'Compiled' in proc.stderr


def test_loss_falls_on_quickstart_data(smoke):
  losses = [r['train/loss'] for r in _metrics(smoke[0]) if 'train/loss' in r]
  assert all(np.isfinite(losses))
  # Chance level is ln(10) = 2.30; the smoke run must be clearly below it after 80 steps.
  assert losses[-1] < losses[0] - 0.3, losses


def test_resume_from_checkpoint_matches_and_hits_compile_cache(smoke):
  workdir, args, _ = smoke
  first = _metrics(workdir)
  # Drop the final checkpoint: the restart restores step 60 and must reproduce steps 61..80.
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '80'))
  _run(args)
  # The resumed run rewinds metrics.jsonl to step 60, then logs its compile time and steps 61..80.
  after = _metrics(workdir)
  restart = max(i for i, r in enumerate(after) if 'compile_s' in r)
  rows = after[restart:]
  assert [r['step'] for r in after[:restart]] == [r['step'] for r in first if r['step'] <= 60]
  assert rows[0]['step'] == 60 and rows[0]['compile_s'] < 0.5 * first[0]['compile_s']
  loss_80 = [r['train/loss'] for r in first if r['step'] == 80 and 'train/loss' in r]
  again_80 = [r['train/loss'] for r in rows if r['step'] == 80 and 'train/loss' in r]
  assert len(again_80) == 1
  np.testing.assert_allclose(again_80, loss_80, rtol=1e-5)
  eval_first = [r for r in first if 'eval/top1' in r][-1]
  eval_again = [r for r in rows if 'eval/top1' in r][-1]
  assert eval_again['eval/count'] == 359
  np.testing.assert_allclose(eval_again['eval/loss'], eval_first['eval/loss'], rtol=1e-5)


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def tiny_runs(tmp_path_factory):
  """The same tiny training run on 1 CPU device, on 8 (mesh data=2 x fsdp=4), and on 2 processes
  of 1 device each (jax.distributed on localhost), all at once."""
  runs, out = [], {}
  port = str(_free_port())
  for name, devices, mesh, processes in ((1, 1, '1,1', 1), (8, 8, '2,4', 1), ('2p', 1, '2,1', 2)):
    workdir = str(tmp_path_factory.mktemp(f'tiny{name}'))
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    for pid in range(processes):
      extra = [str(pid), str(processes), port] if processes > 1 else []
      runs.append((name, workdir, subprocess.Popen(
          [sys.executable, 'tests/tiny_run.py', workdir, mesh] + extra, cwd=ROOT, env=env,
          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
  for name, workdir, proc in runs:
    _, err = proc.communicate(timeout=1800)
    assert proc.returncode == 0, err[-5000:]
    out[name] = (workdir, json.load(open(os.path.join(workdir, 'result.json'))),
                 dict(np.load(os.path.join(workdir, 'result.npz'))))
  return out


@pytest.mark.parametrize('other', [8, '2p'])
def test_one_device_agrees_with_eight_devices_and_two_processes(tiny_runs, other):
  (w1, r1, p1), (wo, ro, po) = tiny_runs[1], tiny_runs[other]
  assert r1['num_sharded'] == 0
  if other == 8:
    assert ro['num_sharded'] > 0  # fsdp really sharded parameters on 8 devices.
  l1 = [r['train/loss'] for r in _metrics(w1) if 'train/loss' in r]
  lo = [r['train/loss'] for r in _metrics(wo) if 'train/loss' in r]
  assert len(l1) == 4
  for w in (w1, wo):  # EMA is on: both the raw and the EMA weights are evaluated.
    assert {'eval/top1', 'eval/ema_top1'} <= set(_metrics(w)[-1])
  np.testing.assert_allclose(lo, l1, rtol=1e-4, atol=1e-5)
  assert p1.keys() == po.keys()
  for k in p1:
    np.testing.assert_allclose(po[k], p1[k], rtol=1e-3, atol=2e-5, err_msg=k)


@pytest.mark.parametrize('devices', [1, 8, '2p'])
def test_exact_eval_counts_on_prime_split(tiny_runs, devices):
  _, r, _ = tiny_runs[devices]
  # Batch 8: 45 batches, the last holding 1 pad.
  assert r['count_8'] == 359 and r['correct_8'] == r['brute_correct']
  assert r['eval_count'] == 359  # Batch 64 in the loop: 6 batches; the last holds 25 pads.
  assert round(r['eval_top1'] * 359) == r['brute_correct']


def test_nan_loss_leaves_state_untouched_and_is_reported(tiny_runs):
  assert tiny_runs[1][1]['nan_guard']
