"""The transfer flow and the baseline tool on a real image set a package ships (no generated data).

scikit-image's LFW subset (100 face / 100 non-face 25x25 crops), written as class folders by
``coatnet_jax.tools.sample_sets`` (the README's commands use the same tool), goes through the real
entry points: a short ``main`` transfer run with BatchNorm statistics recomputed, then ``evaluate``,
``tools.export`` and ``predict``, which must agree with the run's own evaluation on every example;
and ``tools.baseline``, whose splits must be exactly the documented hash rule's files.
"""

import json
import os

import jax
import numpy as np
import pytest

from coatnet_jax import input_pipeline
from coatnet_jax import pretrained
from coatnet_jax import steps
from coatnet_jax.data import folders
from coatnet_jax.tools import sample_sets
from run_module import run_module as _run

pytest.importorskip('skimage')

SPLIT = (60, 10, 30)
CLASSES = ('face', 'non_face')


@pytest.fixture(scope='module')
def faces(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('sample_sets') / 'faces')
  assert sample_sets.write('faces', root) == {'face': 100, 'non_face': 100}
  return root


def _split_files(root, lo, hi):
  return sorted(f'{c}/{n}' for c in CLASSES for n in os.listdir(os.path.join(root, c))
                if lo <= folders.bucket(f'{c}/{n}') < hi)


@pytest.fixture(scope='module')
def faces_run(faces, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('faces_run'))
  proc = _run(['coatnet_jax.main', '--config',
               f'configs/transfer.py:data_dir={faces},variant=coatnet_pico,res=32,eval=test,'
               'batch=16', '--workdir', workdir, '--config.model.dtype=float32',
               f'--config.data.split_percent={SPLIT}', '--config.total_steps=8',
               '--config.batchnorm_batches=2', '--config.eval_every_steps=4',
               '--config.checkpoint_every_steps=4', '--config.log_every_steps=4'])
  return workdir, proc


def test_evaluate_export_and_predict_agree_with_the_runs_eval_on_every_example(
    faces, faces_run, tmp_path):
  workdir, _ = faces_run
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    logged = [r for r in map(json.loads, f) if 'eval/top1' in r][-1]
  test_files = _split_files(faces, SPLIT[0] + SPLIT[1], 100)
  assert logged['step'] == 8 and logged['eval/count'] == len(test_files)

  # The final checkpoint holds the statistics the run evaluated with: its predictions, example by
  # example in the eval iterator's order (the sorted test files), reproduce the logged counts.
  pre = pretrained.read(workdir, use_ema=False)
  model = steps.build_model(pre.config, 2)
  preds, labels = [], []
  for batch in input_pipeline.eval_iterator(pre.config.data, 64):
    logits = model.apply(pre.variables, steps.normalize(batch['image']), train=False)
    real = batch['mask'] > 0
    preds.append(np.argmax(np.asarray(logits), -1)[real])
    labels.append(batch['label'][real])
  preds, labels = np.concatenate(preds), np.concatenate(labels)
  paths, want_labels = folders.Reader(pre.config.data).files('test')  # The eval order.
  assert sorted(os.path.relpath(p, faces) for p in paths) == test_files
  np.testing.assert_array_equal(labels, want_labels)
  for i, t in enumerate(CLASSES):
    for j, p in enumerate(CLASSES):
      assert logged[f'eval/confusion/{t}/{p}'] == np.sum((labels == i) & (preds == j)), (t, p)

  proc = _run(['coatnet_jax.evaluate', '--workdir', workdir, '--weights', 'params'])
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  assert got['count'] == logged['eval/count']
  for t in CLASSES:
    for p in CLASSES:
      assert got[f'confusion/{t}/{p}'] == logged[f'eval/confusion/{t}/{p}'], (t, p)

  archive = str(tmp_path / 'faces.zip')
  _run(['coatnet_jax.tools.export', '--workdir', workdir, '--out', archive, '--weights', 'params'])
  paths = [str(p) for p in paths]
  proc = _run(['coatnet_jax.predict', '--model', archive, '--json'] + paths)
  rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
  assert [r['path'] for r in rows] == paths
  assert [r['top'][0]['class'] for r in rows] == [CLASSES[i] for i in preds]


def test_baseline_uses_exactly_the_runs_splits(faces):
  """At the images' own 25 px the eval transform keeps the pixels, so an independent read of the
  hash rule's files with PIL must give the baseline's numbers exactly."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from sklearn import linear_model, pipeline, preprocessing  # pylint: disable=g-import-not-at-top
  from configs import transfer  # pylint: disable=g-import-not-at-top
  from coatnet_jax.tools import baseline  # pylint: disable=g-import-not-at-top
  config = transfer.get_config(f'data_dir={faces},res=25,eval=test')
  config.data.split_percent = SPLIT
  got = baseline.run(config)
  assert 0 < got['knn']['accuracy'] <= 1

  def read(files):
    x = np.stack([np.asarray(Image.open(os.path.join(faces, f)).convert('RGB')) for f in files])
    return x.reshape(len(x), -1) / 255.0, np.array([CLASSES.index(f.split('/')[0])
                                                      for f in files])
  x_train, y_train = read(_split_files(faces, 0, SPLIT[0]))
  x_test, y_test = read(_split_files(faces, SPLIT[0] + SPLIT[1], 100))
  assert (got['train_count'], got['eval_count']) == (len(y_train), len(y_test))
  c = got['logistic_regression']['params']['C']
  lr = pipeline.make_pipeline(preprocessing.StandardScaler(),
                              linear_model.LogisticRegression(max_iter=2000, C=c))
  acc = lr.fit(x_train, y_train).score(x_test, y_test)
  assert got['logistic_regression']['accuracy'] == pytest.approx(acc, abs=1e-9)
  assert 0.5 < acc < 1  # A real task, not a degenerate one.


def test_linear_probe_features_are_the_classifiers_input(faces, faces_run):
  """The probe's features, through the run's own classifier, give the model's logits."""
  from coatnet_jax.tools import baseline  # pylint: disable=g-import-not-at-top
  workdir, _ = faces_run
  pre = pretrained.read(workdir, use_ema=False)
  images, _ = baseline.split_arrays(pre.config.data, 'test')
  feats = baseline.features(workdir, 32, images)
  model = steps.build_model(pre.config, 2)
  logits = jax.jit(lambda v, x: model.apply(v, steps.normalize(x), train=False))(
      pre.variables, images)
  head = pre.variables['params']['classifier']
  np.testing.assert_allclose(feats @ head['kernel'] + head['bias'], logits, rtol=1e-4, atol=1e-4)
  assert feats.shape == (len(images), head['kernel'].shape[0])
