"""Segmentation metrics: a jittable confusion matrix, and the scores derived from it on the host.

The device side only counts: `confusion_matrix` returns one int32 (K, K) matrix per batch. The
caller sums these in numpy int64 over the evaluation set (int32 wraps after ~2.1e9 pixels in one
cell, a few thousand Cityscapes images) and calls `summarize` once at the end. Scores are never
averaged per batch, because a mean of per-batch IoUs is not the IoU of the data set.

Rules for classes that are missing (K classes, row = true class, column = predicted class):
  * absent from both labels and predictions (row and column all zero): IoU, Dice, precision and
    recall are None, and the class is left out of every mean (neither 0 nor 1);
  * in the labels but never predicted: IoU = Dice = recall = 0 and counted in the means;
    precision is None (0/0) and left out of `mean_precision`;
  * predicted but absent from the labels: IoU = Dice = precision = 0 and counted in `miou`,
    `mean_dice` and `mean_precision` (the union is non-zero, as in mmsegmentation and the
    Cityscapes scripts); recall is None and left out of `mean_recall` and `mean_accuracy`.
  * nothing counted at all (every pixel ignored): `num_pixels` is 0 and every score, scalar or
    per class, is None. None rather than NaN so that the summary stays strict JSON.
"""
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def confusion_matrix(
    labels, predictions, num_classes: int, ignore_index: int = 255, mask=None
) -> jnp.ndarray:
  """Counts (true class, predicted class) pairs into an int32 (num_classes, num_classes) matrix.

  `labels` and `predictions` are integer arrays of one shape (any layout; they are flattened).
  Pixels are skipped when the label is `ignore_index`, when `mask` (optional, same shape) is
  False, e.g. the padding of a last batch, or when the label or prediction lies outside
  [0, num_classes). Out-of-range labels are rejected at the data boundary already; they are
  dropped here too so that no pixel is ever counted in another class's cell.

  Plain jnp ops, no axis names: jit with `num_classes` and `ignore_index` static. Under jit with
  the batch sharded over a mesh (Auto or Explicit axes), the count is global and replicated.
  """
  labels = jnp.ravel(labels).astype(jnp.int32)
  predictions = jnp.ravel(predictions).astype(jnp.int32)
  valid = (
      (labels != ignore_index)
      & (labels >= 0) & (labels < num_classes)
      & (predictions >= 0) & (predictions < num_classes)
  )
  if mask is not None:
    valid &= jnp.ravel(mask).astype(bool)
  # Skipped pixels get weight 0 rather than being removed (boolean indexing has no static shape
  # under jit). The range checks above matter even so: bincount clips a negative index to cell
  # (0, 0), and an out-of-range prediction would land in the next row's cells.
  index = labels * num_classes + predictions
  # With a batch sharded over a mesh of Explicit axes (jax.make_mesh's default), the scatter
  # inside bincount cannot infer its output sharding and fails; asking for a replicated output
  # on the input's own mesh makes each device count its shard and XLA all-reduce the counts
  # (no all-gather of pixels). On unsharded or Auto-sharded inputs that mesh is empty: a no-op.
  replicated = NamedSharding(jax.typeof(index).sharding.mesh, P())
  counts = jnp.bincount(index, weights=valid.astype(jnp.int32), length=num_classes * num_classes,
                        out_sharding=replicated)
  return counts.reshape(num_classes, num_classes)


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  """numerator / denominator, NaN where the denominator is 0 (the score is undefined)."""
  out = np.full(numerator.shape, np.nan)
  np.divide(numerator, denominator, out=out, where=denominator > 0)
  return out


def _mean(values: np.ndarray) -> float | None:
  """Mean over the defined (non-NaN) entries; None when none is defined."""
  defined = values[~np.isnan(values)]
  return float(defined.mean()) if defined.size else None


def _as_list(values: np.ndarray) -> list[float | None]:
  """Per-class scores as python floats, None where undefined."""
  return [None if np.isnan(v) else float(v) for v in values]


def summarize(confusion) -> dict:
  """Scores of an accumulated confusion matrix, as JSON-serialisable python values.

  Keys: pixel_accuracy, mean_accuracy (mean class recall), per_class_iou, miou, per_class_dice,
  mean_dice, precision, recall (per-class lists), mean_precision, mean_recall, num_pixels.
  Undefined scores are None and left out of the means; see the module docstring for the rules.
  """
  confusion = np.asarray(confusion, dtype=np.float64)
  if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
    raise ValueError(f"confusion must be square (K, K), got shape {confusion.shape}")
  true_positives = np.diag(confusion)
  label_counts = confusion.sum(axis=1)  # pixels of each true class
  predicted_counts = confusion.sum(axis=0)
  total = confusion.sum()

  # The union is zero exactly when the class is absent from both, so these NaNs mark the
  # classes that the means must skip.
  iou = _divide(true_positives, label_counts + predicted_counts - true_positives)
  dice = _divide(2.0 * true_positives, label_counts + predicted_counts)
  precision = _divide(true_positives, predicted_counts)
  recall = _divide(true_positives, label_counts)
  pixel_accuracy = float(true_positives.sum() / total) if total > 0 else None
  return {
      "pixel_accuracy": pixel_accuracy,
      "mean_accuracy": _mean(recall),
      "per_class_iou": _as_list(iou),
      "miou": _mean(iou),
      "per_class_dice": _as_list(dice),
      "mean_dice": _mean(dice),
      "precision": _as_list(precision),
      "recall": _as_list(recall),
      "mean_precision": _mean(precision),
      "mean_recall": _mean(recall),
      "num_pixels": int(total),
  }


def fmt_score(value) -> str:
  """A score for titles and logs; None (nothing to score) stays readable."""
  return "n/a" if value is None else f"{value:.3f}"


def class_table(summary: dict, class_names: Sequence[str]) -> str:
  """A fixed-width per-class table (IoU, Dice, precision, recall) for logs; '-' is undefined."""
  if len(class_names) != len(summary["per_class_iou"]):
    raise ValueError(
        f"{len(class_names)} class names for {len(summary['per_class_iou'])} classes")
  width = max([len("class"), len("mean")] + [len(name) for name in class_names])

  def row(name, values):
    cells = ["-" if v is None else f"{v:.4f}" for v in values]
    return f"{name:<{width}}" + "".join(f"{cell:>10}" for cell in cells)

  header = f"{'class':<{width}}" + "".join(
      f"{title:>10}" for title in ("IoU", "Dice", "precision", "recall"))
  lines = [header, "-" * len(header)]
  columns = zip(summary["per_class_iou"], summary["per_class_dice"],
                summary["precision"], summary["recall"])
  lines += [row(name, values) for name, values in zip(class_names, columns)]
  lines.append("-" * len(header))
  lines.append(row("mean", (summary["miou"], summary["mean_dice"],
                            summary["mean_precision"], summary["mean_recall"])))
  return "\n".join(lines)
