"""Classification metrics beyond top-1, computed exactly from a confusion matrix and, for two
classes, the positive-class scores.

The eval step only adds up a (C, C) count matrix on the device (``confusion_counts``), so the
metrics are exact over the whole split however it is batched, padded or sharded; the host turns
the summed matrix into scores (``from_confusion``) with scikit-learn's definitions and
``zero_division=0``. ROC AUC needs every score, so the caller gathers the positive-class
probabilities of the (small, two-class) eval split and calls ``roc_auc``.
"""

import jax
import jax.numpy as jnp
import numpy as np


def confusion_counts(labels, preds, mask, num_classes: int):
  """int32 (num_classes, num_classes) counts, rows true label, columns prediction, of the
  examples with ``mask > 0`` (padding has mask 0). Integer segment sums: exact on any device."""
  index = labels.astype(jnp.int32) * num_classes + preds.astype(jnp.int32)
  counts = jax.ops.segment_sum((mask > 0).astype(jnp.int32), index,
                               num_segments=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes)


def _divide(num, den):
  """num / den, 0 where den is 0: scikit-learn's ``zero_division=0``."""
  num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
  return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def from_confusion(cm) -> dict:
  """'accuracy', 'precision', 'recall', 'f1' and 'confusion_matrix' (nested lists) of a confusion
  matrix (rows true, columns predicted).

  Two classes: binary scores of class 1 (scikit-learn's ``average='binary'``, ``pos_label=1``).
  More: the unweighted mean over all ``num_classes`` classes (``average='macro'`` with
  ``labels=range(num_classes)``), so a class absent from both labels and predictions counts as 0.
  Undefined ratios are 0 (``zero_division=0``); F1 is 2TP / (2TP + FP + FN), as scikit-learn.
  """
  cm = np.asarray(cm, np.int64)
  tp = np.diag(cm)
  pred_sum, true_sum = cm.sum(0), cm.sum(1)
  precision, recall = _divide(tp, pred_sum), _divide(tp, true_sum)
  f1 = _divide(2 * tp, pred_sum + true_sum)
  if cm.shape[0] == 2:
    precision, recall, f1 = precision[1], recall[1], f1[1]
  else:
    precision, recall, f1 = precision.mean(), recall.mean(), f1.mean()
  return {'accuracy': float(_divide(tp.sum(), cm.sum())), 'precision': float(precision),
          'recall': float(recall), 'f1': float(f1), 'confusion_matrix': cm.tolist()}


def roc_auc(scores, labels) -> float:
  """Area under the ROC curve of positive-class ``scores`` against ``labels`` in {0, 1}, as
  ``sklearn.metrics.roc_auc_score``: the Mann-Whitney U statistic with average ranks for ties.

  nan, not an exception, when only one class is present: an eval split (or a process's share) may
  lack one, and a logged nan says so without stopping training.
  """
  scores = np.asarray(scores, np.float64).reshape(-1)
  positive = np.asarray(labels).reshape(-1) == 1
  n_pos = int(positive.sum())
  n_neg = positive.size - n_pos
  if not n_pos or not n_neg:
    return float('nan')
  _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
  ends = np.cumsum(counts)
  ranks = (ends - (counts - 1) / 2.0)[inverse]  # 1-based, ties share their average rank.
  return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def flatten_for_logging(metrics: dict, class_names) -> dict[str, float]:
  """Scalars only, for metrics.jsonl and TensorBoard: scalar entries as they are, and the
  confusion matrix as 'confusion/<true>/<pred>' counts (class indices when ``class_names`` is
  empty)."""
  out = {k: float(v) for k, v in metrics.items() if k != 'confusion_matrix'}
  cm = metrics.get('confusion_matrix')
  if cm is not None:
    names = [str(c) for c in class_names] or [str(i) for i in range(len(cm))]
    if len(names) != len(cm):
      raise ValueError(f'{len(names)} class names for a {len(cm)}x{len(cm)} confusion matrix.')
    for i, row in enumerate(cm):
      for j, count in enumerate(row):
        out[f'confusion/{names[i]}/{names[j]}'] = float(count)
  return out
