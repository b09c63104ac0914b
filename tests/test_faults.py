"""Issue 5: a run is never lost. Each fault is injected into the real main, in subprocesses.

The model is the tiny ``test_tiny`` layout (written out by tests/tiny_quickstart.py) on the
quickstart data and batch (digits, batch 64, 32x32), whose batches are a pure function of (seed,
step), so a resumed run must end bitwise equal to an uninterrupted one on the same device count.
"""

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, 'tests', 'fault_main.py')
TINY = ['--config', 'tests/tiny_quickstart.py:smoke', '--config.log_every_steps=1',
        '--config.tensorboard=False']
STEPS = 30
REF_ARGS = ['--config.checkpoint_every_steps=4', '--config.keep_checkpoints=4']


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp('xla_cache'))


def _start(workdir, steps, extra=(), devices=1, cache_dir=None, env_extra=None, log=None):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  env.update(env_extra or {})
  args = [sys.executable, DRIVER] + TINY + [f'--workdir={workdir}',
                                            f'--config.total_steps={steps}']
  if cache_dir:
    args.append(f'--config.compilation_cache_dir={cache_dir}')
  log = log or f'{workdir}.{time.time_ns()}.log'
  f = open(log, 'w')
  proc = subprocess.Popen(args + list(extra), cwd=ROOT, env=env, stdout=f,
                          stderr=subprocess.STDOUT, text=True)
  proc.log = log
  return proc


def _log(proc):
  with open(proc.log) as f:
    return f.read()


def _finish(proc, timeout=400, ok=True):
  try:
    proc.wait(timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise AssertionError(f'timed out:\n{_log(proc)[-3000:]}')
  if ok:
    assert proc.returncode == 0, _log(proc)[-5000:]
  return proc.returncode, _log(proc)


def _run(*args, **kwargs):
  ok = kwargs.pop('ok', True)
  timeout = kwargs.pop('timeout', 400)
  return _finish(_start(*args, **kwargs), timeout, ok)


def _progress(proc, total):
  """The last step this process logged a progress line for."""
  steps = re.findall(rf'step (\d+)/{total} \|', _log(proc))
  return int(steps[-1]) if steps else 0


def _wait_for(cond, proc, timeout=400):
  t = time.time()
  while not cond():
    assert proc.poll() is None, f'exited early:\n{_log(proc)[-3000:]}'
    assert time.time() - t < timeout, f'timed out:\n{_log(proc)[-3000:]}'
    time.sleep(0.05)


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _assert_no_gap_no_duplicate(workdir, steps):
  rows = _metrics(workdir)
  assert [r['step'] for r in rows if 'train/loss' in r] == list(range(1, steps + 1))
  seen = set()
  for r in rows:
    for k in r:
      if k != 'step':
        assert (r['step'], k) not in seen, (r['step'], k)
        seen.add((r['step'], k))
  assert [r['step'] for r in rows] == sorted(r['step'] for r in rows)


def _ckpt_steps(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())


def _load(workdir, step):
  """A saved train state as {path: numpy array}: TensorStore reads, no pickle."""
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(path)
  tree = getattr(tree, 'item_metadata', tree)
  tree = getattr(tree, 'tree', tree)
  args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree,
                      is_leaf=lambda x: hasattr(x, 'shape'))
  state = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def _assert_bitwise(a, b):
  assert a.keys() == b.keys()
  assert len(a) > 20  # params, batch_stats, optimizer state, rng, step.
  unequal = [k for k in a if not np.array_equal(a[k], b[k])]
  assert not unequal, unequal[:10]


def _tree_snapshot(path):
  out = {}
  for d, _, files in os.walk(path):
    for name in files:
      p = os.path.join(d, name)
      st = os.stat(p)
      out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
  return out


def _last_line(text):
  return [l for l in text.strip().splitlines() if l.strip()][-1]


@pytest.fixture(scope='module')
def reference(tmp_path_factory, cache):
  """An uninterrupted 30-step run: checkpoints every 4 steps, the last 4 kept (20, 24, 28, 30)."""
  workdir = str(tmp_path_factory.mktemp('reference') / 'run')
  _run(workdir, STEPS, REF_ARGS, cache_dir=cache)
  return workdir


def test_kill9_at_three_random_steps_resumes_bitwise(tmp_path, cache, reference):
  seed = int(os.environ.get('FAULT_SEED', time.time_ns() % 10000))
  rng = random.Random(seed)
  kills = [rng.randint(2, 9), rng.randint(11, 19), rng.randint(21, 28)]
  print(f'FAULT_SEED={seed}: kill -9 after steps {kills}')
  workdir = str(tmp_path / 'run')
  for k in kills:
    proc = _start(workdir, STEPS, REF_ARGS, cache_dir=cache)
    _wait_for(lambda: _progress(proc, STEPS) >= k, proc)  # pylint: disable=cell-var-from-loop
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
  _, log = _run(workdir, STEPS, REF_ARGS, cache_dir=cache)
  assert 'Restored step' in log
  _assert_no_gap_no_duplicate(workdir, STEPS)
  _assert_no_gap_no_duplicate(reference, STEPS)
  _assert_bitwise(_load(reference, STEPS), _load(workdir, STEPS))
  losses = lambda w: [r['train/loss'] for r in _metrics(w) if 'train/loss' in r]
  assert losses(workdir) == losses(reference)


def test_sigterm_saves_waits_and_exits_zero(tmp_path, cache):
  workdir = str(tmp_path / 'run')
  total = 100_000
  proc = _start(workdir, total, ['--config.checkpoint_every_steps=1000'], cache_dir=cache)
  _wait_for(lambda: _progress(proc, total) >= 3, proc)
  t = time.time()
  proc.send_signal(signal.SIGTERM)
  rc, log = _finish(proc, timeout=60, ok=False)
  assert rc == 0 and time.time() - t < 60, log[-3000:]
  step = int(re.search(r'Preempted: saved step (\d+)', log).group(1))
  assert step >= 3 and _ckpt_steps(workdir) == [step]
  state = _load(workdir, step)
  assert int(state["['step']"]) == step
  with open(os.path.join(workdir, 'checkpoints', str(step), 'metadata', 'metadata')) as f:
    meta = json.load(f)
  assert meta['data_position'] == step and meta['model'] == 'test_tiny'
  # The saved step restores and the run goes on from it, with a continuous metrics log.
  _, log = _run(workdir, step + 2, cache_dir=cache)
  assert f'Restored step {step}' in log
  _assert_no_gap_no_duplicate(workdir, step + 2)


def _largest(path):
  files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
  return max(files, key=os.path.getsize)


def test_damaged_checkpoints_fall_back_to_newest_intact(tmp_path, cache, reference):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  assert _ckpt_steps(workdir) == [20, 24, 28, 30]
  final = _load(workdir, 30)
  ck = os.path.join(workdir, 'checkpoints')
  os.remove(os.path.join(ck, '30', 'commit_success.txt'))  # Commit marker absent.
  os.remove(_largest(os.path.join(ck, '28', 'state')))  # An array file missing.
  big = _largest(os.path.join(ck, '24', 'state'))  # An array file truncated.
  with open(big, 'r+b') as f:
    f.truncate(os.path.getsize(big) // 2)
  intact = _tree_snapshot(os.path.join(ck, '20'))
  _, log = _run(workdir, STEPS, REF_ARGS, cache_dir=cache)
  for step in (30, 28, 24):
    assert re.search(rf'Checkpoint step {step} .* is damaged', log), log[-5000:]
  assert 'Restored step 20' in log
  # Nothing deleted: the damaged steps are set aside, the intact one is untouched.
  assert sorted(os.listdir(os.path.join(workdir, 'damaged_checkpoints'))) == ['24', '28', '30']
  assert _tree_snapshot(os.path.join(ck, '20')) == intact
  _assert_bitwise(final, _load(workdir, 30))
  _assert_no_gap_no_duplicate(workdir, STEPS)


def test_nan_loss_stops_naming_the_step_and_saves_nothing_nan(tmp_path, cache):
  workdir = str(tmp_path / 'run')
  rc, log = _run(workdir, STEPS, ['--config.checkpoint_every_steps=3',
                                  '--config.log_every_steps=5'], cache_dir=cache,
                 env_extra={'COATNET_TEST_NAN_FROM': '7'}, ok=False)
  assert rc == 1, log[-3000:]
  line = _last_line(log)
  assert line.startswith('error: ') and 'at step 8' in line, line
  assert 'Traceback' not in log
  assert _ckpt_steps(workdir) == [3, 6]
  for step in (3, 6):
    assert all(np.all(np.isfinite(v)) for v in _load(workdir, step).values())


def _mount_tmpfs(path, options):
  os.makedirs(path, exist_ok=True)
  r = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', path],
                     capture_output=True, text=True)
  if r.returncode:
    pytest.skip(f'cannot mount a tmpfs here: {r.stderr.strip()}')


def test_disk_full_during_save_stops_clearly_and_keeps_previous(tmp_path, cache):
  mnt = str(tmp_path / 'small_disk')
  _mount_tmpfs(mnt, 'size=32m')
  try:
    workdir = os.path.join(mnt, 'run')
    proc = _start(workdir, 100_000, ['--config.checkpoint_every_steps=3',
                                     '--config.log_every_steps=100000',
                                     '--config.checkpoint_timeout_s=30'],
                  cache_dir=cache, log=str(tmp_path / 'log'))
    marker = os.path.join(workdir, 'checkpoints', '3', 'commit_success.txt')
    _wait_for(lambda: os.path.exists(marker), proc)
    before = _tree_snapshot(os.path.join(workdir, 'checkpoints', '3'))
    with open(os.path.join(mnt, 'filler'), 'wb') as f:  # The disk fills up.
      try:
        while True:
          f.write(b'\0' * 65536)
          f.flush()
      except OSError:
        pass
    rc, log = _finish(proc, timeout=120, ok=False)
    assert rc == 1, log[-3000:]
    line = _last_line(log)
    # Orbax either raises the ENOSPC or (sometimes) hangs: the bounded wait turns that into an error.
    assert line.startswith('error: ') and ('No space left' in line or 'did not finish' in line), line
    newest = int(re.search(r'newest complete one is step (\d+)', line).group(1))
    assert newest >= 3, line
    # (Orbax logs its background threads' failures with their tracebacks before this line.)
    os.remove(os.path.join(mnt, 'filler'))
    assert 3 in _ckpt_steps(workdir) and newest in _ckpt_steps(workdir)
    assert _tree_snapshot(os.path.join(workdir, 'checkpoints', '3')) == before
    for step in {3, newest}:  # Intact (untouched files) and restorable.
      state = _load(workdir, step)
      assert int(state["['step']"]) == step
  finally:
    subprocess.run(['umount', '-l', mnt], check=False)


def test_restore_on_other_device_counts(tmp_path, cache):
  """8 devices -> 4, and 1 -> 8, with parameters really sharded over fsdp."""
  fsdp = ['--config.mesh.data=1', '--config.mesh.fsdp=-1', '--config.sharding.min_size=64',
          '--config.checkpoint_every_steps=6']
  losses = {}
  for name, first, second in (('8to4', 8, 4), ('1to8', 1, 8)):
    workdir = str(tmp_path / name)
    _run(workdir, 6, fsdp, devices=first, cache_dir=cache)
    _, log = _run(workdir, 9, fsdp, devices=second, cache_dir=cache)
    assert 'Restored step 6' in log and f'over {second} cpu devices' in log
    assert not re.search(r'\] 0 parameter arrays sharded', log)
    _assert_no_gap_no_duplicate(workdir, 9)
    losses[name] = [r['train/loss'] for r in _metrics(workdir) if 'train/loss' in r]
  np.testing.assert_allclose(losses['8to4'], losses['1to8'], rtol=2e-3)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_killed_and_resumed_equal_one_process(tmp_path, cache):
  args = ['--config.checkpoint_every_steps=4', '--config.eval_batch_size=120']
  single = str(tmp_path / 'single')
  ref = _start(single, 16, args, devices=4, cache_dir=cache)
  workdir = str(tmp_path / 'two')

  def launch():
    port = _free_port()
    return [_start(workdir, 16, args + [f'--coordinator_address=127.0.0.1:{port}',
                                        '--num_processes=2', f'--process_id={i}'],
                   devices=2, cache_dir=cache, log=f'{workdir}.{i}.{time.time_ns()}.log')
            for i in range(2)]

  procs = launch()
  _wait_for(lambda: _progress(procs[0], 16) >= 9, procs[0])
  for p in procs:
    os.kill(p.pid, signal.SIGKILL)
  for p in procs:
    p.wait()
  procs = launch()
  logs = [_finish(p)[1] for p in procs]
  # Step 8's save may still have been under way at the kill: then step 4 is the newest intact.
  assert re.search(r'Restored step [48] ', logs[0]) and 'over 4 cpu devices, 2 processes' in logs[0]
  _finish(ref)
  _assert_no_gap_no_duplicate(workdir, 16)
  # Equal up to summation order: gloo's cross-process all-reduce adds in another order than the
  # in-process one, so bitwise equality holds only on one layout (the kill -9 test above).
  losses = lambda w: [r['train/loss'] for r in _metrics(w) if 'train/loss' in r]
  np.testing.assert_allclose(losses(workdir), losses(single), rtol=1e-5)
  a, b = _load(single, 16), _load(workdir, 16)
  assert a.keys() == b.keys() and len(a) > 20
  for k in a:
    if 'step' in k or 'rng' in k:
      assert np.array_equal(a[k], b[k]), k
    else:
      np.testing.assert_allclose(b[k], a[k], rtol=0, atol=2e-3, err_msg=k)


@pytest.mark.parametrize('case', ['model', 'dataset', 'field', 'type', 'data_dir', 'other_model',
                                  'read_only'])
def test_bad_input_is_one_line_and_workdir_untouched(tmp_path, reference, case):
  workdir = str(tmp_path / 'run')
  extra = {'model': ['--config.model.name=coatnet_99'],
           'dataset': ['--config.data.name=no_such_dataset'],
           'field': ['--config.optim.no_such_field=1'],
           'type': ['--config.batch_size=sixty-four'],
           'data_dir': ['--config.data.name=imagenet2012',
                        f'--config.data.data_dir={tmp_path}/missing'],
           'other_model': ['--config.model.name=coatnet_pico'],
           'read_only': []}[case]
  if case == 'other_model':
    shutil.copytree(reference, workdir)
  if case == 'read_only':
    _mount_tmpfs(str(tmp_path / 'ro'), 'ro,size=1m')
    workdir = str(tmp_path / 'ro' / 'run')
  before = _tree_snapshot(workdir) if os.path.exists(workdir) else None
  try:
    rc, log = _run(workdir, 4, extra, ok=False, timeout=120, log=str(tmp_path / 'log'))
  finally:
    if case == 'read_only':
      subprocess.run(['umount', '-l', str(tmp_path / 'ro')], check=False)
  assert rc == 1, log[-3000:]
  line = _last_line(log)
  assert line.startswith('error: ') and 'Traceback' not in log, log[-3000:]
  expect = {'model': 'coatnet_99', 'dataset': 'no_such_dataset', 'field': 'no_such_field',
            'type': 'sixty-four', 'data_dir': 'imagenet2012', 'other_model': 'test_tiny',
            'read_only': 'not writable'}[case]
  assert expect in line, line
  if before is None:
    assert not os.path.exists(workdir)
  else:
    assert _tree_snapshot(workdir) == before


# Issue 15: one run per workdir, Ctrl-C, unreadable metadata, resume changes, bad values.


def _bytes(workdir):
  """Every file of the workdir with its bytes: 'untouched' means byte for byte (the lock file,
  which names the last process that held the workdir, aside)."""
  out = {}
  for d, _, files in os.walk(workdir):
    for name in files:
      if name == 'run.lock':
        continue
      with open(os.path.join(d, name), 'rb') as f:
        out[os.path.relpath(os.path.join(d, name), workdir)] = f.read()
  return out


def test_second_run_is_refused_naming_the_holder_and_ctrl_c_saves(tmp_path, cache):
  workdir = str(tmp_path / 'run')
  total = 100_000
  first = _start(workdir, total, ['--config.checkpoint_every_steps=1000'], cache_dir=cache)
  _wait_for(lambda: _progress(first, total) >= 2, first)
  config = _bytes(workdir)['config.json']
  rc, log = _run(workdir, total, ['--config.checkpoint_every_steps=1000', '--config.seed=5'],
                 ok=False, timeout=120, log=str(tmp_path / 'second.log'))
  line = _last_line(log)
  assert rc == 1 and line.startswith('error: ') and 'Traceback' not in log, log[-3000:]
  assert 'in use' in line and f'pid {first.pid} ' in line and 'started' in line, line
  assert _bytes(workdir)['config.json'] == config  # The second run wrote nothing.
  # Ctrl-C: the first run saves the step it reached and exits 0, as on SIGTERM.
  first.send_signal(signal.SIGINT)
  rc, log = _finish(first, timeout=60, ok=False)
  assert rc == 0 and 'Traceback' not in log and 'KeyboardInterrupt' not in log, log[-3000:]
  step = int(re.search(r'Preempted: saved step (\d+)', log).group(1))
  assert step >= 2 and _ckpt_steps(workdir) == [step]
  assert int(_load(workdir, step)["['step']"]) == step
  # The lock went with the process: the same workdir resumes at once.
  _, log = _run(workdir, step + 1, cache_dir=cache)
  assert f'Restored step {step}' in log
  _assert_no_gap_no_duplicate(workdir, step + 1)


def _garble_metadata(workdir):
  for step in _ckpt_steps(workdir):
    with open(os.path.join(workdir, 'checkpoints', str(step), 'metadata', 'metadata'), 'w') as f:
      f.write('{"model": "test_tiny", "arch')  # Cut mid-write.


def test_unreadable_metadata_everywhere_restores_the_arrays_and_keeps_history(tmp_path, cache,
                                                                              reference):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  _garble_metadata(workdir)
  history = _metrics(workdir)
  _, log = _run(workdir, STEPS + 2, REF_ARGS, cache_dir=cache)
  assert 'Restored step 30' in log and 'metadata is unreadable' in log, log[-3000:]
  rows = _metrics(workdir)
  assert rows[:len(history)] == history  # Nothing of the history dropped.
  _assert_no_gap_no_duplicate(workdir, STEPS + 2)


def test_no_restorable_checkpoint_stops_and_leaves_everything(tmp_path, cache, reference):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  _garble_metadata(workdir)
  for step in _ckpt_steps(workdir):  # The arrays too: nothing can be recovered.
    os.remove(_largest(os.path.join(workdir, 'checkpoints', str(step), 'state')))
  before = _bytes(workdir)
  rc, log = _run(workdir, STEPS, REF_ARGS, cache_dir=cache, ok=False)
  line = _last_line(log)
  assert rc == 1 and line.startswith('error: ') and 'nothing was moved' in line, log[-3000:]
  assert _bytes(workdir) == before


def test_resume_refuses_changed_config_and_records_accepted_changes(tmp_path, cache, reference):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  before = _bytes(workdir)
  for steps, extra, expect in (
      (STEPS, ['--config.optim.lr=0.5', '--config.batch_size=32', '--config.seed=3'],
       ('optim.lr 0.002 -> 0.5', 'batch_size 64 -> 32', 'seed 0 -> 3')),
      (15, ['--config.allow_resume_changes=True'], ('end at step 15, below step 30',))):
    rc, log = _run(workdir, steps, REF_ARGS + extra, ok=False, timeout=120,
                   log=str(tmp_path / 'log'))
    line = _last_line(log)
    assert rc == 1 and line.startswith('error: ') and 'Traceback' not in log, log[-3000:]
    assert all(e in line for e in expect), line
    assert _bytes(workdir) == before, extra
  # Longer, logged and saved at another cadence: accepted and recorded.
  _, log = _run(workdir, STEPS + 4, ['--config.checkpoint_every_steps=2',
                                      '--config.keep_checkpoints=4'], cache_dir=cache)
  assert 'Restored step 30' in log
  with open(os.path.join(workdir, 'config_history.jsonl')) as f:
    history = [json.loads(line) for line in f]
  assert history == [{'step': 30, 'time': history[0]['time'], 'changes': {
      'checkpoint_every_steps': [4, 2], 'total_steps': [30, 34]}}], history
  assert _ckpt_steps(workdir)[-1] == 34 and min(_ckpt_steps(workdir)) >= 20
  _assert_no_gap_no_duplicate(workdir, STEPS + 4)


def test_every_bad_value_is_one_line_each_and_the_run_untouched(tmp_path, reference):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  before = _bytes(workdir)
  bad = {'--config.batch_size=-8': 'batch_size=-8', '--config.data.image_size=0': 'image_size=0',
         '--config.accum_steps=0': 'accum_steps=0', '--config.mesh.data=0': 'mesh.data=0',
         '--config.log_every_steps=0': 'log_every_steps=0', '--config.loss.kind=hinge': "'hinge'",
         '--config.optim.schedule=step': "'step'", '--config.model.dtype=float16': 'float16',
         '--config.num_classes=3': 'num_classes=3'}
  rc, log = _run(workdir, -5, list(bad), ok=False, timeout=120, log=str(tmp_path / 'log'))
  errors = [l for l in log.splitlines() if l.startswith('error: ')]
  assert rc == 1 and 'Traceback' not in log, log[-3000:]
  for flag, expect in list(bad.items()) + [('total_steps', 'total_steps=-5')]:
    assert sum(expect in e for e in errors) == 1, (flag, errors)
  assert len(errors) == len(bad) + 1, errors
  assert _bytes(workdir) == before
  # Against the data and the devices: a batch larger than the train split; on 8 devices a mesh
  # that does not fit them, an eval batch they do not divide, and accumulation that leaves
  # micro-batches of 4 for 8 devices.
  for extra, devices, expect in (
      (['--config.batch_size=2000'], 1, ['larger than the 1438 examples']),
      (['--config.mesh.data=3', '--config.mesh.fsdp=1', '--config.eval_batch_size=60',
        '--config.batch_size=64', '--config.accum_steps=16'], 8,
       ['does not fit the 8 devices', 'eval_batch_size=60 is not divisible by the 8 devices',
        'accum_steps=16 = 4 is not divisible by the 8 devices; use a multiple of 128'])):
    rc, log = _run(workdir, STEPS, extra, devices=devices, ok=False, timeout=120,
                   log=str(tmp_path / 'log'))
    errors = [l for l in log.splitlines() if l.startswith('error: ')]
    assert rc == 1 and len(errors) == len(expect), (extra, log[-3000:])
    assert all(any(e in l for l in errors) for e in expect), errors
    assert _bytes(workdir) == before


def test_a_second_ctrl_c_aborts_at_once():
  from coatnet_jax import preemption as preemption_lib  # pylint: disable=g-import-not-at-top
  preemption = preemption_lib.Preemption()
  try:
    os.kill(os.getpid(), signal.SIGINT)  # The first: save at the end of the step.
    time.sleep(0.1)
    assert preemption.signalled == 'SIGINT' and preemption.reached(None, 1)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.1)
  finally:
    preemption.close()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
