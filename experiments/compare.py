"""Trains every model under one budget and writes the comparison table.

    python -m experiments.compare --dataset=synthetic
    python -m experiments.compare --dataset=camvid --data_dir=../shared/data/camvid --budget=300 \
        --config.data.crop_size=128 --config.data.scale_range=0.5,1.0

Writes WORKDIR/{compare.md, compare.json, compare.png, per_class_iou.png}, one run directory
per model and ensemble/; running it again reuses finished models and resumes an unfinished one.
"""

from absl import flags

from experiments import launch
from experiments.configs import compare as compare_config
from jaxseg.studies import compare

_BUDGET = flags.DEFINE_string("budget", None, "Training budget per model: steps (300) or "
                              "epochs (2epochs) of the global batch (default: the dataset's "
                              "preset).")
_MODELS = flags.DEFINE_list("models", None, "Rows to train, e.g. unet,deeplab_resnet101 "
                            "(default: all).")
_DATA = launch.DataFlags("runs/compare_DATASET")
_CONFIG = launch.define_config("config", compare_config.get_config(),
                               "Config overrides, e.g. --config.train.batch_size=16.")


def main():
  config = _CONFIG.value
  _DATA.apply(config)
  config = compare.configure(config, models=_MODELS.value, budget=_BUDGET.value)
  workdir = _DATA.workdir.value or f"runs/compare_{config.data.name}"
  result = compare.run(config, workdir)
  print(compare.table(result))
  print(f"wrote {workdir}/compare.md, compare.json, compare.png, per_class_iou.png")


if __name__ == "__main__":
  launch.run(main)
