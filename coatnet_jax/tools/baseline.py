r"""Simple baselines beside a transfer run: does the deep model earn its keep?

  python -m coatnet_jax.tools.baseline --data_dir DIR [--config configs/transfer.py:res=64,eval=test]
      [--init PRETRAINED_RUN] [--config.data.split_percent='(60,10,30)']

Fits, with scikit-learn, on exactly the run's train split and scores on its evaluation split
(``data.eval_split``; the same files, split rule and class names as the run, read through
``input_pipeline.eval_iterator``: each image through the run's EVAL transform at
``data.image_size``, i.e. the pixels evaluation feeds the model):

  logistic_regression  on standardised pixels, C picked by 5-fold cross-validation on train
  knn                  k-nearest neighbours on pixels, k picked by 5-fold cross-validation
  linear_probe         (with --init) logistic regression on the frozen pre-trained model's
                       features (the input of its classifier), C by cross-validation

Prints one line per method (accuracy and macro F1 on the evaluation split) and, last, the same as
one JSON object.
"""

import json

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from coatnet_jax import cli
from coatnet_jax import errors
from coatnet_jax import input_pipeline


def _define_flags():
  """Defined only when run as a command: tests import this module beside other tools' flags."""
  config_flags.DEFINE_config_file(
      'config', 'configs/transfer.py', 'The run\'s config (default configs/transfer.py), with '
      '":ARGS"; --config.a.b=VALUE overrides.', lock_config=False)
  flags.DEFINE_string('data_dir', None, 'The class folders (sets config.data.data_dir).')
  flags.DEFINE_string('init', None, 'A pre-trained run or import: adds a linear probe on '
                      'its frozen features.')

C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
K_GRID = (1, 3, 5, 7, 9)


def split_arrays(data_config, split):
  """(uint8 images (N, H, W, 3), int labels) of ``split``, through the eval transform."""
  c = data_config.copy_and_resolve_references()
  c.eval_split = split
  images, labels = [], []
  for batch in input_pipeline.eval_iterator(c, 64):
    real = batch['mask'] > 0
    images.append(batch['image'][real])
    labels.append(batch['label'][real])
  return np.concatenate(images), np.concatenate(labels)


def _cv(train_labels):
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  folds = int(min(5, np.bincount(train_labels)[np.bincount(train_labels) > 0].min()))
  if folds < 2:
    raise ValueError('every class needs at least 2 training images for cross-validation')
  return model_selection.StratifiedKFold(folds, shuffle=True, random_state=0)


def _fit_score(estimator, grid, x_train, y_train, x_eval, y_eval):
  """Grid search by cross-validation on train, refit on all of train, score on eval."""
  from sklearn import metrics, model_selection  # pylint: disable=g-import-not-at-top
  search = model_selection.GridSearchCV(estimator, grid, cv=_cv(y_train), n_jobs=1)
  search.fit(x_train, y_train)
  pred = search.predict(x_eval)
  return {'accuracy': float(metrics.accuracy_score(y_eval, pred)),
          'f1_macro': float(metrics.f1_score(y_eval, pred, average='macro')),
          'params': {k.split('__')[-1]: v for k, v in search.best_params_.items()}}


def _logistic():
  from sklearn import linear_model, pipeline, preprocessing  # pylint: disable=g-import-not-at-top
  return pipeline.make_pipeline(preprocessing.StandardScaler(),
                                linear_model.LogisticRegression(max_iter=2000))


def pixel_baselines(x_train, y_train, x_eval, y_eval):
  """{'logistic_regression': ..., 'knn': ...} on flattened pixels in [0, 1]."""
  from sklearn import neighbors  # pylint: disable=g-import-not-at-top
  flat = lambda x: x.reshape(len(x), -1).astype(np.float32) / 255.0  # pylint: disable=unnecessary-lambda-assignment
  xt, xe = flat(x_train), flat(x_eval)
  return {
      'logistic_regression': _fit_score(_logistic(), {'logisticregression__C': C_GRID},
                                        xt, y_train, xe, y_eval),
      'knn': _fit_score(neighbors.KNeighborsClassifier(), {'n_neighbors': K_GRID},
                        xt, y_train, xe, y_eval),
  }


def features(init, image_size, images, batch=64):
  """The frozen pre-trained model's features (its classifier's input) of uint8 ``images``."""
  from coatnet_jax import pretrained, steps  # pylint: disable=g-import-not-at-top
  pre = pretrained.read(init)
  model = steps.build_model(pre.config, pre.num_classes)
  variables = pretrained.adapt(pre, model, image_size, pre.num_classes)
  pre_logits = model.options.head_pre_logits
  layer = 'pre_logits' if pre_logits else 'head_norm'

  @jax.jit
  def apply(x):
    _, state = model.apply(variables, steps.normalize(x), train=False,
                           capture_intermediates=lambda m, _: m.name == layer,
                           mutable=['intermediates'])
    out = state['intermediates'][layer]['__call__'][0]
    return jax.numpy.tanh(out) if pre_logits else out

  return np.concatenate([np.asarray(apply(images[i:i + batch]))
                         for i in range(0, len(images), batch)])


def run(config, init=None):
  """All baselines for ``config``'s train and eval splits; returns the result dict."""
  d = config.data
  x_train, y_train = split_arrays(d, d.train_split)
  x_eval, y_eval = split_arrays(d, d.eval_split)
  out = {'train_split': d.train_split, 'eval_split': d.eval_split, 'train_count': len(y_train),
         'eval_count': len(y_eval), 'image_size': d.image_size}
  out.update(pixel_baselines(x_train, y_train, x_eval, y_eval))
  if init:
    f_train = features(init, d.image_size, x_train)
    f_eval = features(init, d.image_size, x_eval)
    out['linear_probe'] = _fit_score(_logistic(), {'logisticregression__C': C_GRID},
                                     f_train, y_train, f_eval, y_eval)
  return out


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments {argv[1:]}; see --help.')
  config = flags.FLAGS.config
  if flags.FLAGS.data_dir:
    config.data.data_dir = flags.FLAGS.data_dir
  if not config.data.data_dir and config.data.name == 'folders':
    raise errors.UserError('--data_dir DIR is required: the class folders of the run.')
  result = run(config, flags.FLAGS.init)
  for name in ('logistic_regression', 'knn', 'linear_probe'):
    if name in result:
      r = result[name]
      print(f'{name}: accuracy {r["accuracy"]:.4f}, macro F1 {r["f1_macro"]:.4f} on '
            f'{result["eval_count"]} {result["eval_split"]} images ({result["train_count"]} '
            f'{result["train_split"]}; {", ".join(f"{k}={v}" for k, v in r["params"].items())})')
  print(json.dumps(result))


if __name__ == '__main__':
  _define_flags()
  cli.run(main, flags_parser=cli.parse_config_flags, user_errors=(ValueError, OSError))
