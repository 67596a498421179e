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

_MODEL = launch.ModelFlags()
_OUT = flags.DEFINE_string("out", None, "Output directory (default: the run's workdir; "
                           "required for an ensemble).")
_DATASET = flags.DEFINE_string("dataset", None, "Dataset (default: the run's).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Root of the dataset on disk.")
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate: val or test (default: the "
                             "run's val split).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per evaluation batch (all devices).")
_NUM = flags.DEFINE_integer("num_examples", 0, "Evaluate the first N examples only (0: all).")


def main():
  result, report = evaluate.run_evaluation(
      _MODEL.workdirs, weights=_MODEL.weights(), out_dir=_OUT.value, dataset=_DATASET.value,
      data_dir=_DATA_DIR.value, split=_SPLIT.value, tta=_MODEL.tta(), window=_MODEL.window(),
      batch_size=_BATCH.value, num_examples=_NUM.value or None,
      loading=_MODEL.loading())
  print(metrics.class_table(result.summary, list(report["per_class"])))
  print(json.dumps({k: report[k] for k in ("miou", "pixel_accuracy", "mean_dice", "tta",
                                           "window", "examples", "seconds")}))
  print(f"wrote {_OUT.value or _MODEL.workdirs[0]}/eval.json, confusion.png, "
        "eval_predictions.png")


if __name__ == "__main__":
  launch.run(main)
