"""Confusion counts, precision / recall / F1 and ROC AUC against scikit-learn, on random
predictions with absent classes, ties and masked padding."""

import jax
import numpy as np
import pytest
from sklearn import metrics as skm

from coatnet_jax import eval_metrics


def _case(seed, num_classes, n=97, pad=31):
  """Labels and predictions of ``n`` examples plus a masked tail of ``pad`` random ones. With 3+
  classes the last class is never a label, class 0 never a prediction; with 7 class 5 is neither."""
  rng = np.random.default_rng(seed)
  absent = {num_classes - 1} | ({5} if num_classes == 7 else set())
  true_classes = [c for c in range(num_classes) if num_classes == 2 or c not in absent]
  pred_classes = [c for c in range(num_classes) if num_classes == 2 or c not in {0, 5}]
  labels = rng.choice(true_classes, n + pad)
  preds = rng.choice(pred_classes, n + pad)
  if num_classes == 2 and seed % 2:
    preds[:] = 0  # Class 1 never predicted: precision and F1 divide by zero.
  mask = np.r_[np.ones(n), np.zeros(pad)].astype(np.float32)
  return labels.astype(np.int32), preds.astype(np.int32), mask


@pytest.mark.parametrize('num_classes', [2, 3, 7])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_metrics_match_sklearn(seed, num_classes):
  labels, preds, mask = _case(seed, num_classes)
  cm = jax.jit(eval_metrics.confusion_counts, static_argnums=3)(labels, preds, mask, num_classes)
  assert cm.dtype == np.int32
  y, p = labels[mask > 0], preds[mask > 0]
  classes = list(range(num_classes))
  np.testing.assert_array_equal(cm, skm.confusion_matrix(y, p, labels=classes))

  got = eval_metrics.from_confusion(cm)
  kw = (dict(average='binary', pos_label=1) if num_classes == 2 else
        dict(average='macro', labels=classes))
  want = {'accuracy': skm.accuracy_score(y, p),
          'precision': skm.precision_score(y, p, zero_division=0, **kw),
          'recall': skm.recall_score(y, p, zero_division=0, **kw),
          'f1': skm.f1_score(y, p, zero_division=0, **kw)}
  for k, v in want.items():
    assert got[k] == pytest.approx(v, abs=1e-12, rel=0), k
  assert got['confusion_matrix'] == skm.confusion_matrix(y, p, labels=classes).tolist()


@pytest.mark.parametrize('seed', [0, 1, 2, 3])
def test_roc_auc_matches_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, 200)
  scores = np.round(np.clip(rng.normal(0.4 + 0.2 * labels, 0.25), 0, 1), 1)  # Many ties.
  assert len(np.unique(scores)) < 15
  got = eval_metrics.roc_auc(scores.astype(np.float32), labels)
  assert got == pytest.approx(skm.roc_auc_score(labels, scores.astype(np.float32)), abs=1e-12)


def test_roc_auc_with_one_class_is_nan():
  assert np.isnan(eval_metrics.roc_auc([0.1, 0.7, 0.3], [1, 1, 1]))
  assert np.isnan(eval_metrics.roc_auc([0.1, 0.7], [0, 0]))


def test_flatten_for_logging_names_the_confusion_cells():
  m = eval_metrics.from_confusion(np.array([[5, 1], [2, 7]]))
  m['roc_auc'] = 0.9
  flat = eval_metrics.flatten_for_logging(m, ('normal', 'abnormal'))
  assert flat['confusion/normal/abnormal'] == 1.0 and flat['confusion/abnormal/normal'] == 2.0
  assert flat['roc_auc'] == 0.9 and flat['recall'] == pytest.approx(7 / 9)
  assert all(isinstance(v, float) for v in flat.values()) and len(flat) == 5 + 4
  assert 'confusion/1/0' in eval_metrics.flatten_for_logging(m, ())
