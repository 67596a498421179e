"""Metrics checked against scikit-learn on random segmentations, plus the absent-class rules."""
import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from sklearn import metrics as skm

from jaxseg import metrics

IGNORE = 255


def _random_segmentation(seed, shape, num_classes, ignore_fraction=0.1):
  """Random labels (some pixels set to IGNORE) and predictions that agree with them ~half the time."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, shape)
  predictions = np.where(rng.random(shape) < 0.5, labels, rng.integers(0, num_classes, shape))
  labels = np.where(rng.random(shape) < ignore_fraction, IGNORE, labels)
  return labels.astype(np.int32), predictions.astype(np.int32)


def _kept(labels, predictions):
  """The flat (labels, predictions) pairs that the metric must count."""
  keep = labels.ravel() != IGNORE
  return labels.ravel()[keep], predictions.ravel()[keep]


def _summary(labels, predictions, num_classes):
  return metrics.summarize(np.asarray(metrics.confusion_matrix(labels, predictions, num_classes)))


def _assert_per_class(ours, reference, defined):
  """None in `ours` exactly where the score is undefined, equal to `reference` elsewhere."""
  assert [v is not None for v in ours] == list(defined)
  np.testing.assert_allclose(
      [v for v in ours if v is not None], np.asarray(reference)[defined], rtol=1e-12)


@pytest.mark.parametrize("num_classes,shape", [(2, (64,)), (5, (2, 16, 16)), (19, (2, 32, 48))])
@pytest.mark.parametrize("jit", [False, True])
def test_confusion_matrix_matches_sklearn(num_classes, shape, jit):
  labels, predictions = _random_segmentation(num_classes, shape, num_classes)
  fn = metrics.confusion_matrix
  if jit:
    fn = jax.jit(fn, static_argnames=("num_classes", "ignore_index"))
  confusion = fn(labels, predictions, num_classes=num_classes, ignore_index=IGNORE)
  assert confusion.shape == (num_classes, num_classes) and confusion.dtype == jnp.int32
  expected = skm.confusion_matrix(*_kept(labels, predictions), labels=range(num_classes))
  np.testing.assert_array_equal(np.asarray(confusion), expected)


@pytest.mark.parametrize("num_classes", [3, 7])
def test_summary_matches_sklearn(num_classes):
  labels, predictions = _random_segmentation(10 + num_classes, (2, 24, 24), num_classes)
  summary = _summary(labels, predictions, num_classes)
  y_true, y_pred = _kept(labels, predictions)
  classes = list(range(num_classes))
  assert set(y_true) == set(classes)  # balanced accuracy below needs every class in the labels

  assert summary["num_pixels"] == y_true.size
  assert summary["pixel_accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred), rel=1e-12)
  assert summary["mean_accuracy"] == pytest.approx(
      skm.balanced_accuracy_score(y_true, y_pred), rel=1e-12)
  in_labels, in_predictions = np.isin(classes, y_true), np.isin(classes, y_pred)
  for key, score, defined in [
      ("per_class_iou", skm.jaccard_score, in_labels | in_predictions),
      ("per_class_dice", skm.f1_score, in_labels | in_predictions),
      ("precision", skm.precision_score, in_predictions),
      ("recall", skm.recall_score, in_labels)]:
    reference = score(y_true, y_pred, labels=classes, average=None, zero_division=0)
    _assert_per_class(summary[key], reference, defined)
  assert summary["miou"] == pytest.approx(
      skm.jaccard_score(y_true, y_pred, labels=classes, average="macro"), rel=1e-12)
  assert summary["mean_dice"] == pytest.approx(
      skm.f1_score(y_true, y_pred, labels=classes, average="macro"), rel=1e-12)
  json.dumps(summary, allow_nan=False)


def test_class_absent_from_both_is_excluded_from_means():
  num_classes = 4
  labels, predictions = _random_segmentation(1, (2, 16, 16), 3)
  labels = np.where(labels == 2, 3, labels)  # classes 0, 1, 3 appear; class 2 never does
  predictions = np.where(predictions == 2, 3, predictions)
  summary = _summary(labels, predictions, num_classes)
  for key in ("per_class_iou", "per_class_dice", "precision", "recall"):
    assert summary[key][2] is None and None not in summary[key][:2] + summary[key][3:]
  y_true, y_pred = _kept(labels, predictions)
  present = [0, 1, 3]
  assert summary["miou"] == pytest.approx(
      np.mean(skm.jaccard_score(y_true, y_pred, labels=present, average=None)), rel=1e-12)
  assert summary["mean_dice"] == pytest.approx(
      np.mean(skm.f1_score(y_true, y_pred, labels=present, average=None)), rel=1e-12)
  assert summary["mean_accuracy"] == pytest.approx(
      skm.balanced_accuracy_score(y_true, y_pred), rel=1e-12)


def test_class_in_labels_never_predicted_counts_as_zero():
  num_classes = 4
  labels, predictions = _random_segmentation(2, (2, 16, 16), num_classes)
  predictions = np.where(predictions == 3, 0, predictions)
  assert (labels == 3).any()
  summary = _summary(labels, predictions, num_classes)
  assert summary["per_class_iou"][3] == 0.0 and summary["recall"][3] == 0.0
  assert summary["precision"][3] is None  # never predicted: 0/0
  iou = summary["per_class_iou"]
  assert summary["miou"] == pytest.approx(np.mean(iou), rel=1e-12)  # the 0 is in the mean
  assert summary["miou"] < np.mean(iou[:3])


def test_class_predicted_but_absent_from_labels():
  num_classes = 4
  labels, predictions = _random_segmentation(3, (2, 16, 16), num_classes)
  labels = np.where(labels == 3, 0, labels)
  assert (predictions[labels != IGNORE] == 3).any()
  summary = _summary(labels, predictions, num_classes)
  assert summary["per_class_iou"][3] == 0.0 and summary["precision"][3] == 0.0
  assert summary["recall"][3] is None
  assert summary["miou"] == pytest.approx(np.mean(summary["per_class_iou"]), rel=1e-12)
  assert summary["mean_accuracy"] == pytest.approx(np.mean(summary["recall"][:3]), rel=1e-12)
  assert summary["mean_recall"] == summary["mean_accuracy"]


def test_all_pixels_ignored_gives_zero_counts_and_none_scores():
  predictions = np.random.default_rng(4).integers(0, 3, (2, 8, 8))
  labels = np.full((2, 8, 8), IGNORE)
  confusion = metrics.confusion_matrix(labels, predictions, 3)
  assert not np.asarray(confusion).any()
  summary = metrics.summarize(np.asarray(confusion))
  assert summary["num_pixels"] == 0
  for key, value in summary.items():
    if key != "num_pixels":
      assert value is None or value == [None] * 3, key
  json.dumps(summary, allow_nan=False)


@pytest.mark.parametrize("jit", [False, True])
def test_out_of_range_values_are_not_counted(jit):
  num_classes = 4
  labels, predictions = _random_segmentation(5, (2, 16, 16), num_classes)
  rng = np.random.default_rng(6)
  bad_labels = rng.random(labels.shape) < 0.2
  bad_predictions = rng.random(labels.shape) < 0.1
  # -1 would wrap or clip to cell (0, 0); num_classes..254 would spill into other rows.
  labels = np.where(bad_labels, rng.choice([-1, num_classes, 100, 254], labels.shape), labels)
  predictions = np.where(bad_predictions, rng.choice([-1, num_classes], labels.shape), predictions)
  fn = metrics.confusion_matrix
  if jit:
    fn = jax.jit(fn, static_argnames=("num_classes", "ignore_index"))
  confusion = np.asarray(fn(labels, predictions, num_classes=num_classes))
  keep = ((labels >= 0) & (labels < num_classes) & (predictions >= 0)
          & (predictions < num_classes)).ravel()
  expected = skm.confusion_matrix(
      labels.ravel()[keep], predictions.ravel()[keep], labels=range(num_classes))
  np.testing.assert_array_equal(confusion, expected)


def test_mask_skips_pixels():
  labels, predictions = _random_segmentation(7, (4, 8, 8), 3)
  mask = np.zeros(labels.shape, bool)
  mask[:3] = True  # e.g. the last image is padding
  confusion = metrics.confusion_matrix(labels, predictions, 3, mask=mask)
  np.testing.assert_array_equal(confusion, metrics.confusion_matrix(labels[:3], predictions[:3], 3))


def test_halves_accumulate_to_whole():
  labels, predictions = _random_segmentation(8, (4, 16, 16), 6)
  halves = sum(np.asarray(metrics.confusion_matrix(labels[i:i + 2], predictions[i:i + 2], 6),
                          dtype=np.int64) for i in (0, 2))
  whole = np.asarray(metrics.confusion_matrix(labels, predictions, 6))
  assert whole.sum() > 0
  np.testing.assert_array_equal(halves, whole)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
@pytest.mark.parametrize("set_mesh", [False, True])
def test_sharded_batch_matches_unsharded(axis_type, set_mesh):
  assert jax.device_count() == 8
  num_classes = 5
  labels, predictions = _random_segmentation(9, (8, 16, 16), num_classes)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
  sharding = NamedSharding(mesh, P("data"))
  labels_sharded = jax.device_put(labels, sharding)
  predictions_sharded = jax.device_put(predictions, sharding)
  assert len(labels_sharded.sharding.device_set) == 8

  @jax.jit
  def eval_step(labels, predictions):
    return metrics.confusion_matrix(labels, predictions, num_classes)

  with jax.set_mesh(mesh) if set_mesh else contextlib.nullcontext():
    sharded = eval_step(labels_sharded, predictions_sharded)
    compiled = eval_step.lower(labels_sharded, predictions_sharded).compile().as_text()
  np.testing.assert_array_equal(sharded, metrics.confusion_matrix(labels, predictions, num_classes))
  # Each device counts its own pixels and only the (K, K) counts cross devices.
  assert "all-reduce" in compiled and "all-gather" not in compiled


def test_class_table_lists_every_class():
  labels, predictions = _random_segmentation(11, (2, 8, 8), 3)
  labels = np.where(labels == 2, 0, labels)
  predictions = np.where(predictions == 2, 0, predictions)  # class 2 absent: shown as '-'
  summary = _summary(labels, predictions, 3)
  table = metrics.class_table(summary, ["road", "sky", "bicycle"]).splitlines()
  assert len(table) == 3 + 2 + 2 and len({len(line) for line in table}) == 1
  assert table[2].startswith("road") and f"{summary['per_class_iou'][0]:.4f}" in table[2]
  assert table[4].split()[1:] == ["-"] * 4
  assert table[-1].startswith("mean") and f"{summary['miou']:.4f}" in table[-1]
  with pytest.raises(ValueError):
    metrics.class_table(summary, ["road", "sky"])
