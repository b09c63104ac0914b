"""MFU arithmetic, the device peak table, the progress line and the two metric sinks."""

import json
import time

import pytest

from coatnet_jax import metrics


def test_peak_lookup_prefers_the_longest_match_and_warns_once(caplog):
  assert metrics.peak_flops('TPU v5 lite') == 197e12
  assert metrics.peak_flops('TPU v5p') == 459e12
  assert metrics.peak_flops('NVIDIA H100 80GB HBM3') == 989e12
  with caplog.at_level('WARNING'):
    assert metrics.peak_flops('cpu-test-kind') is None
    assert metrics.peak_flops('cpu-test-kind') is None
  assert sum('cpu-test-kind' in r.message for r in caplog.records) == 1


def test_throughput_mfu_and_excluded_time(monkeypatch):
  clock = iter([0.0, 12.0, 12.0])
  monkeypatch.setattr(time, 'perf_counter', lambda: next(clock))
  t = metrics.Throughput(global_batch=100, num_devices=4, total_steps=1000,
                         flops_per_image=metrics.train_flops_per_image(10**9), peak=1e12)
  t.start(0)
  t.exclude(2.0)  # 2 s of eval inside the window do not count as step time.
  r = t.report(10)
  assert r['step_time_ms'] == pytest.approx(1000.0)
  assert r['img_per_s'] == pytest.approx(100.0)
  assert r['img_per_s_per_device'] == pytest.approx(25.0)
  assert r['mfu'] == pytest.approx(100 * 6e9 / (4 * 1e12))
  assert r['eta_s'] == pytest.approx(990.0)
  line = metrics.progress_line(10, 1000, {'loss': 1.0, 'lr': 1e-3, **r})
  for part in ('step 10/1000', 'loss 1.0000', 'img/s', '25.0/device', 'MFU 15.0%', 'ETA 16m30s'):
    assert part in line


def test_no_mfu_without_macs_or_peak():
  t = metrics.Throughput(8, 1, 10, None, 1e12)
  t.start(0)
  time.sleep(0.01)
  assert 'mfu' not in t.report(1)


def test_writer_jsonl_and_tensorboard(tmp_path):
  w = metrics.MetricWriter(str(tmp_path))
  w.write(5, {'train/loss': 1.5})
  w.write(7, {'eval/top1': 0.25})
  w.close()
  rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert rows == [{'step': 5, 'train/loss': 1.5}, {'step': 7, 'eval/top1': 0.25}]
  # pylint: disable-next=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(tmp_path / 'tensorboard'))
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars('train/loss')] == [(5, 1.5)]
