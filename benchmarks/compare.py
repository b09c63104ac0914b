r"""This project's steps against timm's on one card: each row in its own process, the table last.

  python3 -m benchmarks.compare [--full] [--budget_s 480] [--out DIR]

Rows (quick run): for CoAtNet-0 at batch 256 and CoAtNet-2 at batch 128, 224 px, bf16: our train
step and timm's ``torch.compile`` train step, our inference step (BatchNorm folded, as evaluate
and export run it) and timm's eager inference. ``--full`` adds timm's eager train step, timm's
compiled inference, our unfolded inference and the paper form of our train step.

Every row is independent: it runs in a subprocess under a time limit, and a row that fails or
times out is recorded with its reason while the others go on. Each row is appended, as it
finishes, to a results file new to this run (``--out``/results-<time>.jsonl), and its output to
``bench.log`` beside it, so an interrupted run keeps every row before the interruption. A row is
started only if its estimated time fits in what is left of ``--budget_s`` (the quick run needs
about 8 minutes on an H200 by the estimates in ``plan``, compiles included; not yet measured);
the rows left out are listed. The table (img/s, ratio to timm's best for the same model, mode and
batch, peak memory, MFU) prints last, and ``--table FILE`` prints it again from a results file.

MFU is counted MACs x 2 (x 3 for a train step) per image against the card's dense bf16 peak
(``coatnet_jax.metrics.PEAK_FLOPS``; timm_peer.py holds the same figures).
"""

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOALS = {'train': {'coatnet_0': 2.5, 'coatnet_2': 2.0}, 'inference': {}}
DEFAULT_GOAL = {'train': 2.0, 'inference': 3.0}


@dataclasses.dataclass
class Row:
  impl: str  # 'ours' or 'timm'
  model: str  # Our variant name.
  timm_model: str
  batch: int
  mode: str
  extra: tuple = ()
  estimate_s: float = 60.0  # Start-up, compile and timed steps on an H200.

  @property
  def name(self):
    return ' '.join([self.impl, self.model, self.mode, str(self.batch), *self.extra])

  def command(self, res, steps, warmup, dtype):
    if self.impl == 'ours':
      return [sys.executable, os.path.join(ROOT, 'benchmarks', 'train_throughput.py'),
              '--variant', self.model, '--batch', str(self.batch), '--res', str(res),
              '--dtype', dtype, '--steps', str(steps), '--warmup', str(warmup),
              '--mode', self.mode, *self.extra]
    return [sys.executable, os.path.join(ROOT, 'benchmarks', 'timm_peer.py'),
            '--model', self.timm_model, '--batch', str(self.batch), '--res', str(res),
            '--steps', str(steps), '--warmup', str(warmup), '--mode', self.mode, *self.extra]


def plan(cases, full: bool) -> list:
  """The rows in order of importance: each model's like-for-like pair first."""
  rows = []
  for model, timm_model, batch in cases:
    # Seconds on an H200 (performance.md: JAX compiles 46-58 s, torch.compile 83-103 s), start-up
    # and timed steps included; bigger variants take about 1.2x.
    big = 1.0 if model == 'coatnet_0' else 1.2
    rows += [Row('ours', model, timm_model, batch, 'train', estimate_s=65 * big),
             Row('timm', model, timm_model, batch, 'train', ('--compile',), 100 * big),
             Row('ours', model, timm_model, batch, 'inference', estimate_s=35 * big),
             Row('timm', model, timm_model, batch, 'inference', estimate_s=15 * big)]
  if full:
    for model, timm_model, batch in cases:
      rows += [Row('timm', model, timm_model, batch, 'train', estimate_s=30),
               Row('timm', model, timm_model, batch, 'inference', ('--compile',), 100),
               Row('ours', model, timm_model, batch, 'inference', ('--no_fold',), 35),
               Row('ours', model, timm_model, batch, 'train', ('--form', 'paper'), 75)]
  return rows


def run_rows(rows, results: str, log: str, budget_s: float, res: int, steps: int, warmup: int,
             dtype: str, scale: float = 1.0, only: str = '') -> list:
  """Runs each row that fits in the budget; appends its JSON (or its failure) to ``results``."""
  start, skipped = time.monotonic(), []
  for row in rows:
    if only and not re.search(only, row.name):
      continue
    left = budget_s - (time.monotonic() - start)
    if row.estimate_s * scale > left:
      skipped.append(row.name)
      continue
    t0 = time.monotonic()
    with open(log, 'a') as f:
      f.write(f'\n=== {row.name}\n')
      f.flush()
      try:
        proc = subprocess.run(row.command(res, steps, warmup, dtype), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=f, text=True,
                              timeout=max(left, 1.0))
        out, reason = proc.stdout, None if proc.returncode == 0 else f'exit {proc.returncode}'
      except subprocess.TimeoutExpired as e:
        out, reason = e.stdout or '', f'timed out after {left:.0f} s (the budget)'
        out = out.decode() if isinstance(out, bytes) else out
      f.write(out)
    record = None
    if reason is None:
      try:
        record = json.loads(out.strip().splitlines()[-1])
      except (ValueError, IndexError):
        reason = 'no JSON line in the output'
    if record is None:
      record = {'impl': row.impl, 'model': row.model, 'mode': row.mode, 'batch': row.batch,
                'failed': f'{reason}; see {os.path.basename(log)}'}
    record.update(row=row.name, case=row.model, wall_s=time.monotonic() - t0)
    with open(results, 'a') as f:
      f.write(json.dumps(record) + '\n')
    what = record.get('failed') or '{:.0f} img/s'.format(record['img_per_s'])
    print(f"{row.name}: {what} ({record['wall_s']:.0f} s)", flush=True)
  for name in skipped:
    with open(results, 'a') as f:
      f.write(json.dumps({'row': name, 'skipped': f'over the {budget_s:.0f} s budget'}) + '\n')
  return skipped


def _fmt(x, fmt):
  return '-' if x is None else fmt.format(x)


def table(results: str) -> str:
  rows = [json.loads(l) for l in open(results) if l.strip().startswith('{')]
  done = [r for r in rows if 'img_per_s' in r]
  lines = []
  devices = sorted({r['device'] for r in done})
  versions = {k: r[k] for r in done for k in ('jax', 'torch', 'timm') if k in r}
  lines.append(f"device: {', '.join(devices) or '?'} | {versions} | {os.path.basename(results)}")
  lines.append('| row | img/s | peak GiB | MFU | compile s | ratio to timm best | goal |')
  lines.append('|---|---|---|---|---|---|---|')
  for r in done:
    ratio, goal = '-', '-'
    if r['impl'] == 'coatnet_jax':
      peers = [p for p in done if p['impl'].startswith('timm') and p['mode'] == r['mode']
               and p['batch'] == r['batch'] and p['case'] == r['case']]
      if peers:
        best = max(peers, key=lambda p: p['img_per_s'])
        x = r['img_per_s'] / best['img_per_s']
        want = GOALS[r['mode']].get(r['model'], DEFAULT_GOAL[r['mode']])
        mem = ''
        if r['mode'] == 'train' and r['peak_mem_gib'] and best['peak_mem_gib']:
          mem = f", memory {r['peak_mem_gib'] / best['peak_mem_gib']:.2f}x"
        ratio = f"{x:.2f}x ({best['impl']}{mem})"
        goal = f">= {want}x {'met' if x >= want else 'NOT met'}"
    lines.append(f"| {r['row']} | {r['img_per_s']:.0f} | {_fmt(r['peak_mem_gib'], '{:.1f}')} | "
                 f"{_fmt(r['mfu'], '{:.1%}')} | {r['compile_s']:.0f} | {ratio} | {goal} |")
  for r in rows:
    if 'failed' in r or 'skipped' in r:
      why = f"failed: {r['failed']}" if 'failed' in r else f"skipped: {r['skipped']}"
      lines.append(f"| {r['row']} | {why} | | | | | |")
  return '\n'.join(lines)


def parse_cases(text: str) -> list:
  """'coatnet_0:256,coatnet_2:128' or 'ours:timm_name:batch,...' -> [(ours, timm, batch)]."""
  cases = []
  for item in filter(None, text.split(',')):
    parts = item.split(':')
    if len(parts) == 2:
      parts = [parts[0], f'{parts[0]}_224', parts[1]]
    if len(parts) != 3 or not parts[2].isdigit():
      raise SystemExit(f'error: --cases item {item!r} is not MODEL:BATCH or '
                       'MODEL:TIMM_MODEL:BATCH.')
    cases.append((parts[0], parts[1], int(parts[2])))
  return cases


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--cases', default='coatnet_0:256,coatnet_2:128')
  p.add_argument('--res', type=int, default=224)
  p.add_argument('--dtype', default='bfloat16')
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--full', action='store_true')
  p.add_argument('--budget_s', type=float, default=480.0)
  p.add_argument('--estimate_scale', type=float, default=1.0,
                 help='multiplies the per-row time estimates (slower machines)')
  p.add_argument('--out', default=os.environ.get('OUT') or os.path.join(ROOT, 'build', 'bench'))
  p.add_argument('--rows', default='', help='a regex: run only the rows whose name matches')
  p.add_argument('--table', help='print the table of an existing results file and exit')
  a = p.parse_args(argv)
  if a.table:
    print(table(a.table))
    return
  os.makedirs(a.out, exist_ok=True)
  stamp = time.strftime('%Y%m%d-%H%M%S')
  results = os.path.join(a.out, f'results-{stamp}.jsonl')
  log = os.path.join(a.out, 'bench.log')
  rows = plan(parse_cases(a.cases), a.full)
  print(f'{len(rows)} rows, budget {a.budget_s:.0f} s; results in {results}', flush=True)
  run_rows(rows, results, log, a.budget_s, a.res, a.steps, a.warmup, a.dtype, a.estimate_scale,
           a.rows)
  print(table(results))


if __name__ == '__main__':
  main()
