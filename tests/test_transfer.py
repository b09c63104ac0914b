"""Transfer to a small two-class folder dataset through configs/transfer.py and main.

The test draws its own data: two imbalanced classes of 40x40 images (a size that is not a multiple
of 32) in the DIR/<class>/<image> layout, so the hash split, the class names, the balanced loss,
the per-class metrics and an odd input size all go through the real entry point. Every logged
metric is recomputed from the checkpoint's own predictions with scikit-learn.
"""

import json
import os

import jax
import numpy as np
import pytest
from sklearn import metrics as skm

from configs import quickstart
from coatnet_jax import checkpointing
from coatnet_jax import input_pipeline
from coatnet_jax import pretrained
from coatnet_jax import steps
from run_module import run_module as _run

SIZE = 40
CLASSES = ('abnormal', 'normal')


def _write_dataset(root):
  """'abnormal' (110 images) and 'normal' (60): overlapping colours and noise, so that the
  metrics after a few steps are neither perfect nor chance."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for name, count in zip(CLASSES, (110, 60)):
    os.makedirs(os.path.join(root, name))
    for i in range(count):
      base = np.array((150, 100, 155) if name == 'abnormal' else (170, 125, 165))
      image = np.clip(base + rng.normal(0, 12, 3) + rng.normal(0, 40, (SIZE, SIZE, 3)), 0, 255)
      ys, xs = rng.integers(0, SIZE, 8), rng.integers(0, SIZE, 8)
      image[ys, xs] = 255 if name == 'abnormal' else 0
      png = tf.io.encode_png(image.astype(np.uint8)).numpy()
      with open(os.path.join(root, name, f'{name}_{i:03d}.png'), 'wb') as f:
        f.write(png)
  # One truncated file in the train split: skipped, counted, reported in metrics.jsonl.
  from coatnet_jax.data import folders  # pylint: disable=g-import-not-at-top
  broken = next(f'broken_{i}.png' for i in range(100)
                if folders.bucket(f'normal/broken_{i}.png') < 80)
  with open(os.path.join(root, 'normal', broken), 'wb') as f:
    f.write(png[:len(png) // 3])


@pytest.fixture(scope='module')
def transfer_run(tmp_path_factory):
  data = str(tmp_path_factory.mktemp('gashis_like'))
  _write_dataset(data)
  source = str(tmp_path_factory.mktemp('pretrained'))
  c = quickstart.get_config()
  model = steps.build_model(c, 10)
  checkpointing.save_variables(source, c, model.init(jax.random.key(0),
                                                     np.zeros((1, 32, 32, 3), np.float32)), 10)
  workdir = str(tmp_path_factory.mktemp('transfer'))
  proc = _run(['coatnet_jax.main', '--config',
               f'configs/transfer.py:data_dir={data},variant=coatnet_pico,init={source},'
               f'res={SIZE},balanced,batch=16', '--workdir', workdir,
               '--config.model.dtype=float32', '--config.total_steps=60',
               '--config.eval_every_steps=20', '--config.checkpoint_every_steps=20',
               '--config.log_every_steps=20',
               # Running averages and the 8-100% crop: with recomputed BatchNorm statistics this
               # generated set is separated perfectly (ROC AUC 1 at every eval), which makes the
               # AUC comparison below degenerate. tests/test_sample_sets.py covers the new default.
               '--config.batchnorm_batches=0', '--config.data.crop_area=(0.08,1.0)'])
  return data, workdir, proc


def _eval_records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if 'eval/f1' in r]


def test_metrics_equal_sklearn_on_the_checkpoints_predictions(transfer_run):
  _, workdir, proc = transfer_run
  assert 'Class-balanced loss' in proc.stderr and 'Fine-tuning from' in proc.stderr
  assert 'Confusion matrix' in proc.stderr
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    assert json.loads(f.readline())['data/skipped_images'] == 1
  records = _eval_records(workdir)
  assert [r['step'] for r in records] == [20, 40, 60]
  assert checkpointing.latest_metadata(workdir)['class_names'] == list(CLASSES)
  summaries = []
  for logged in records:  # Every eval has its checkpoint (saved at the same steps, 3 kept).
    want = _sklearn_metrics(workdir, logged['step'])
    for k, v in want.items():
      if k != 'confusion':
        assert logged[f'eval/{k}'] == pytest.approx(v, abs=1e-6), (logged['step'], k)
    for i, t in enumerate(CLASSES):
      for j, p in enumerate(CLASSES):
        assert logged[f'eval/confusion/{t}/{p}'] == want['confusion'][i, j]
    summaries.append((want['f1'], want['roc_auc']))
  print('transfer eval (f1, roc_auc) at steps 20, 40, 60:', summaries)
  # Not a degenerate comparison: some eval has an F1 and an AUC strictly between the extremes.
  assert any(0 < f1 < 1 and 0.5 < auc < 1 for f1, auc in summaries)


def test_evaluate_reports_the_runs_metrics_by_class_name(transfer_run):
  _, workdir, _ = transfer_run
  proc = _run(['coatnet_jax.evaluate', '--workdir', workdir, '--weights', 'params'])
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  logged = _eval_records(workdir)[-1]
  assert got['step'] == logged['step'] == 60
  for t in CLASSES:
    for p in CLASSES:
      assert got[f'confusion/{t}/{p}'] == logged[f'eval/confusion/{t}/{p}'], (t, p)
  for k in ('top1', 'f1', 'roc_auc'):
    assert got[k] == pytest.approx(logged[f'eval/{k}'], abs=1e-6), k


def _sklearn_metrics(workdir, step):
  """The metrics of checkpoint ``step``'s own predictions on the eval split, by scikit-learn."""
  pre = pretrained.read(workdir, step=step, use_ema=False)
  assert pre.step == step
  config = pre.config
  model = steps.build_model(config, 2)
  labels, probs = [], []
  for batch in input_pipeline.eval_iterator(config.data, 64):
    logits = model.apply(pre.variables, steps.normalize(batch['image']), train=False)
    real = batch['mask'] > 0
    labels.append(batch['label'][real])
    probs.append(np.asarray(jax.nn.softmax(logits))[real])
  labels, probs = np.concatenate(labels), np.concatenate(probs)
  preds = probs.argmax(-1)
  return {'count': len(labels), 'accuracy': skm.accuracy_score(labels, preds),
          'precision': skm.precision_score(labels, preds, zero_division=0),
          'recall': skm.recall_score(labels, preds, zero_division=0),
          'f1': skm.f1_score(labels, preds, zero_division=0),
          'roc_auc': skm.roc_auc_score(labels, probs[:, 1]),
          'confusion': skm.confusion_matrix(labels, preds, labels=[0, 1])}


def test_the_split_is_the_documented_hash_rule(transfer_run):
  data, workdir, _ = transfer_run
  from coatnet_jax.data import folders  # pylint: disable=g-import-not-at-top
  val = [f'{c}/{n}' for c in CLASSES for n in os.listdir(os.path.join(data, c))
         if 80 <= folders.bucket(f'{c}/{n}') < 90]
  assert _eval_records(workdir)[-1]['eval/count'] == len(val)


def test_exported_model_predicts_the_folder_class_names(transfer_run, tmp_path):
  data, workdir, _ = transfer_run
  archive = str(tmp_path / 'model.zip')
  _run(['coatnet_jax.tools.export', '--workdir', workdir, '--out', archive, '--weights', 'params'])
  images = [os.path.join(data, c, f'{c}_000.png') for c in CLASSES]
  proc = _run(['coatnet_jax.predict', '--model', archive, '--json'] + images)
  rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
  assert [r['path'] for r in rows] == images

  pre = pretrained.read(workdir, use_ema=False)
  model = steps.build_model(pre.config, 2)
  from coatnet_jax.data import transforms  # pylint: disable=g-import-not-at-top
  for row, path in zip(rows, images):
    image = transforms.eval_image(open(path, 'rb').read(), SIZE, None, 'bicubic').numpy()
    logits = model.apply(pre.variables, steps.normalize(image[None]), train=False)
    probs = np.asarray(jax.nn.softmax(logits))[0]
    assert [t['class'] for t in row['top']] == [CLASSES[i] for i in np.argsort(-probs)]
    assert [t['probability'] for t in row['top']] == pytest.approx(np.sort(probs)[::-1], abs=1e-4)


@pytest.mark.parametrize('accum_steps', [1, 2])
def test_class_weights_weight_each_examples_loss(accum_steps):
  """The step's loss equals the weighted mean of per-example losses computed apart from it."""
  from coatnet_jax import losses, sharding  # pylint: disable=g-import-not-at-top
  c = quickstart.get_config()
  c.data.image_size = 16
  c.loss.label_smoothing = 0.0
  c.accum_steps = accum_steps
  model = steps.build_model(c, 2)
  schedule, tx = steps.build_optimizer(c, 100)
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1}, jax.devices()[:1])
  state = steps.make_init_fn(c, model, tx)()
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4, 16, 16, 3)).astype(np.uint8)
  labels = np.array([0, 1, 1, 1], np.int32)
  weights = losses.balanced_class_weights(np.array([10, 30]))
  np.testing.assert_allclose(weights, [2.0, 2.0 / 3.0])

  def weighted_mean(rows):
    # Train mode (batch statistics of these rows); the quickstart model has no stochastic depth.
    logits, _ = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                            steps.normalize(images[rows]), train=True,
                            mutable=['batch_stats'])
    nll = -np.asarray(jax.nn.log_softmax(logits))[np.arange(len(rows)), labels[rows]]
    return np.mean(weights[labels[rows]] * nll)

  # Micro-batch i of the accumulated step takes rows i, i + accum, ...
  want = np.mean([weighted_mean(np.arange(4)[i::accum_steps]) for i in range(accum_steps)])
  batch = {'image': images, 'label': labels}
  _, m = jax.jit(steps.make_train_step(c, model, tx, schedule, 2, mesh, weights))(state, batch)
  _, plain = jax.jit(steps.make_train_step(c, model, tx, schedule, 2, mesh))(state, batch)
  assert float(m['loss']) == pytest.approx(float(want), rel=1e-5)
  assert abs(float(m['loss']) - float(plain['loss'])) > 1e-4
