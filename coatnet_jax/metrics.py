"""What a user sees: the progress line, MFU from counted MACs, metrics.jsonl and TensorBoard, and
the run's other record files (config.json, config_history.jsonl).

TensorBoard events are written with tensorboard's TF-free record writer rather than clu's
``SummaryWriter``: importing ``clu.metric_writers`` imports TensorFlow, which the quickstart and the
step path must not. Only process 0 writes.
"""

import json
import os
import socket
import time
from typing import Optional

from absl import logging
import jax

from coatnet_jax import cost

# Dense bf16 peak FLOP/s per chip (vendor figures), keyed by a substring of ``device.device_kind``.
# MFU is reported against these; float32 runs therefore show a lower, but comparable, MFU.
PEAK_FLOPS = {
    'TPU v2': 45e12,
    'TPU v3': 123e12,
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,  # v5e
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v5': 459e12,
    'TPU v6 lite': 918e12,  # Trillium (v6e)
    'TPU7x': 2307e12,
    'H200': 989e12,
    'H100': 989e12,
    'A100': 312e12,
    'L4': 121e12,
    'A10G': 70e12,
}

_warned_devices = set()
CONFIG_HISTORY = 'config_history.jsonl'  # Every config change a resume accepted.


def peak_flops(device_kind: str) -> Optional[float]:
  """Peak FLOP/s of one device, or None (with one warning per kind) when the kind is unknown."""
  for key in sorted(PEAK_FLOPS, key=len, reverse=True):  # Longest match first: 'TPU v5 lite'.
    if key.lower() in device_kind.lower():
      return PEAK_FLOPS[key]
  if device_kind not in _warned_devices:
    _warned_devices.add(device_kind)
    logging.warning('No peak FLOP/s known for device kind %r; MFU is not reported.', device_kind)
  return None


def train_flops_per_image(macs: Optional[int]) -> Optional[float]:
  """2 FLOPs per MAC in the forward pass, x3 for forward + backward."""
  return None if macs is None else 6.0 * macs


def model_macs(model, image_size: int) -> Optional[int]:
  """Counted MACs per image (for MFU), or None if counting fails."""
  try:
    return int(cost.model_macs(model, image_size, batch=1))
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('Counting model MACs failed (%s); MFU is not reported.', e)
    return None


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


class Throughput:
  """Img/s, MFU and ETA over the last reporting window; time spent in eval and saves is excluded."""

  def __init__(self, global_batch, num_devices, total_steps, flops_per_image, peak):
    self.global_batch, self.num_devices, self.total_steps = global_batch, num_devices, total_steps
    self.flops_per_image, self.peak = flops_per_image, peak
    self._t0, self._step0, self._paused = None, None, 0.0

  def start(self, step):
    self._t0, self._step0, self._paused = time.perf_counter(), step, 0.0

  def exclude(self, seconds):
    """Time spent outside training steps (eval, checkpointing) inside the current window."""
    self._paused += seconds

  def report(self, step) -> dict:
    elapsed = time.perf_counter() - self._t0 - self._paused
    steps = step - self._step0
    out = {}
    if steps > 0 and elapsed > 0:
      step_time = elapsed / steps
      ips = self.global_batch / step_time
      out = {'step_time_ms': 1e3 * step_time, 'img_per_s': ips,
             'img_per_s_per_device': ips / self.num_devices,
             'eta_s': step_time * (self.total_steps - step)}
      if self.flops_per_image and self.peak:
        out['mfu'] = ips * self.flops_per_image / (self.num_devices * self.peak)
    self.start(step)
    return out


def progress_line(step, total, m) -> str:
  parts = [f'step {step}/{total}', f'loss {m["loss"]:.4f}', f'lr {m["lr"]:.3g}']
  if 'img_per_s' in m:
    parts.append(f'{m["img_per_s"]:.0f} img/s ({m["img_per_s_per_device"]:.1f}/device)')
  if 'mfu' in m:
    parts.append(f'MFU {100 * m["mfu"]:.1f}%')
  if 'step_time_ms' in m:
    parts.append(f'step {m["step_time_ms"]:.1f} ms')
  if 'eta_s' in m:
    parts.append(f'ETA {format_duration(m["eta_s"])}')
  return ' | '.join(parts)


class _TensorBoard:
  """Scalars into an event file, without TensorFlow."""

  def __init__(self, logdir):
    # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer import record_writer
    # pylint: enable=g-import-not-at-top
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    os.makedirs(logdir, exist_ok=True)
    name = f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}'
    self._file = open(os.path.join(logdir, name), 'wb')
    self._writer = record_writer.RecordWriter(self._file)
    self._write(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def _write(self, event):
    self._writer.write(event.SerializeToString())

  def scalars(self, step, values):
    v = [self._summary_pb2.Summary.Value(tag=k, simple_value=float(x)) for k, x in values.items()]
    self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                      summary=self._summary_pb2.Summary(value=v)))
    self._file.flush()

  def close(self):
    self._file.close()


def record_kind(values) -> frozenset:
  """What a record reports: the first parts of its keys ({'eval'}, {'train'}, ...)."""
  return frozenset(str(k).split('/')[0] for k in values if k != 'step')


class MetricWriter:
  """One JSON object per line in ``workdir/metrics.jsonl`` plus TensorBoard; process 0 only.

  Never two records of one kind for one step: a record of a (step, kind) already in the file (a
  finished run started again evaluates its last step again) is not written a second time.
  """

  def __init__(self, workdir, tensorboard: bool = True):
    self._active = jax.process_index() == 0
    self._jsonl = self._tb = None
    self._written = set()
    if self._active:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, 'metrics.jsonl')
      if os.path.exists(path):
        with open(path) as f:
          for line in f:
            try:
              record = json.loads(line)
            except ValueError:
              continue
            self._written.add((record.get('step'), record_kind(record)))
      self._jsonl = open(path, 'a')
      if tensorboard:
        self._tb = _TensorBoard(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, values: dict):
    if not self._active:
      return
    values = {k: float(v) for k, v in values.items()}
    key = (int(step), record_kind(values))
    if key in self._written:
      logging.info('Step %d already has a %s record in metrics.jsonl; not writing it again.',
                   step, '/'.join(sorted(key[1])))
      return
    self._written.add(key)
    self._jsonl.write(json.dumps({'step': int(step), **values}) + '\n')
    self._jsonl.flush()
    if self._tb:
      self._tb.scalars(step, values)

  def close(self):
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()


def rewind_metrics(workdir: str, step: int) -> None:
  """Drops metrics.jsonl records after ``step`` (atomically), so a resumed run has no gap and
  no duplicate: the steps after the restored checkpoint are written again by the resumed run."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if jax.process_index() or not os.path.exists(path):
    return
  keep, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:  # A line cut by kill -9.
        dropped += 1
        continue
      if record.get('step', 0) > step or (record.get('step') == step and 'compile_s' in record):
        dropped += 1
        continue
      keep.append(line if line.endswith('\n') else line + '\n')
  if dropped:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(keep)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    logging.info('Resuming at step %d: dropped %d metrics.jsonl records after it.', step, dropped)


def write_config(config, workdir: str) -> None:
  """The run's config as ``workdir/config.json``, for a reader (a resume compares the
  checkpoint's own copy)."""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def record_config_changes(workdir: str, step: int, changes: dict) -> None:
  """Appends the config fields a resume changed to ``config_history.jsonl`` (process 0)."""
  if not changes or jax.process_index():
    return
  logging.warning('Resuming at step %d with config changes: %s', step,
                  '; '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in changes.items()))
  with open(os.path.join(workdir, CONFIG_HISTORY), 'a') as f:
    f.write(json.dumps({'step': step, 'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
                        'changes': changes}) + '\n')
