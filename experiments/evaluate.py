"""Evaluates a trained run, or an ensemble of runs, on a dataset split.

    python -m experiments.evaluate --workdir=runs/deeplab_resnet101_synthetic
    python -m experiments.evaluate --workdir=runs/deeplab_resnet50_camvid --tta
    python -m experiments.evaluate --workdir=runs/a,runs/b --weights=2,1 --out=runs/ensemble_ab

The dataset defaults to the run's own (its val split, window and reader options); --dataset
and --data_dir evaluate on another copy or dataset with the same classes. --tta averages
scales 0.5-1.75 and horizontal flips (--scales/--flip choose others). Writes OUT/eval.json
(scores, per-class IoU/Dice/precision/recall, settings, confusion matrix), confusion.png and
eval_predictions.png; OUT is the run's workdir unless --out says otherwise.
"""

import json

from absl import flags

from experiments import launch
from jaxseg import evaluate, metrics
from jaxseg.errors import JaxsegError
from jaxseg.inference import DEFAULT_TTA, TTA

_WORKDIR = flags.DEFINE_list("workdir", None, "Run directory, or several (comma-separated) for "
                             "an ensemble.", required=True)
_WEIGHTS = flags.DEFINE_list("weights", None, "Ensemble weights, one per run (default equal).")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: the run's workdir; "
                           "required for an ensemble).")
_DATASET = flags.DEFINE_string("dataset", None, "Dataset (default: the run's).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Root of the dataset on disk.")
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate: val or test (default: the "
                             "run's val split).")
_TTA = flags.DEFINE_bool("tta", False, "Test-time augmentation: scales 0.5-1.75 and flips.")
_SCALES = flags.DEFINE_list("scales", None, "Test-time scales, e.g. 0.75,1,1.25 (implies TTA).")
_FLIP = flags.DEFINE_bool("flip", None, "Add horizontally mirrored views (default: with --tta).")
_WINDOW = flags.DEFINE_string("window", None, "Sliding window HxW, or 0 for whole images "
                              "(default: the dataset's evaluation setting).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per evaluation batch (all devices).")
_NUM = flags.DEFINE_integer("num_examples", 0, "Evaluate the first N examples only (0: all).")


def _floats(values, flag):
  try:
    return [float(v) for v in values]
  except ValueError:
    raise JaxsegError(f"--{flag}={','.join(values)}: expected numbers") from None


def main():
  scales = tuple(_floats(_SCALES.value, "scales")) if _SCALES.value else None
  tta = DEFAULT_TTA if _TTA.value else TTA()
  tta = TTA(scales or tta.scales, tta.flip if _FLIP.value is None else _FLIP.value)
  weights = _floats(_WEIGHTS.value, "weights") if _WEIGHTS.value else None
  result, report = evaluate.run_evaluation(
      _WORKDIR.value, weights=weights, out_dir=_OUT.value, dataset=_DATASET.value,
      data_dir=_DATA_DIR.value, split=_SPLIT.value, tta=tta,
      window=evaluate.parse_window(_WINDOW.value), batch_size=_BATCH.value,
      num_examples=_NUM.value or None)
  print(metrics.class_table(result.summary, list(report["per_class"])))
  print(json.dumps({k: report[k] for k in ("miou", "pixel_accuracy", "mean_dice", "tta",
                                           "window", "examples", "seconds")}))
  out = _OUT.value or _WORKDIR.value[0]
  print(f"wrote {out}/eval.json, confusion.png, eval_predictions.png")


if __name__ == "__main__":
  launch.run(main)
