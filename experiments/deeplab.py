"""Trains and evaluates DeepLabV3+.

    python -m experiments.deeplab --backbone=resnet101
    python -m experiments.deeplab --backbone=resnet50 --workdir=runs/r50 --config.train.steps=50

Writes WORKDIR/{metrics.jsonl, summary.json, predictions.png, checkpoints/, tensorboard/};
running the same command again resumes from WORKDIR's latest checkpoint.
"""

import json

from absl import flags

from experiments import launch
from experiments.configs import deeplab as deeplab_config
from jaxseg.backbones import BACKBONES
from jaxseg.data import DATASETS
from jaxseg.train import segmentation

_BACKBONE = flags.DEFINE_string(
    "backbone", None, f"Encoder: one of {', '.join(sorted(BACKBONES))} (default: the config's, "
    "resnet101).")
_DATASET = flags.DEFINE_string(
    "dataset", None, f"Dataset: one of {', '.join(sorted(DATASETS))} (default: the config's, "
    "synthetic).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Root of the dataset on disk.")
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Output directory (default runs/deeplab_BACKBONE_DATASET).")
_CONFIG = launch.define_config("config", deeplab_config.get_config(),
                               "Config overrides, e.g. --config.train.steps=100.")


def main():
  config = _CONFIG.value
  # The selector flags win over --config.model.backbone / --config.data.name when given.
  config.model.backbone = launch.choose(_BACKBONE.value or config.model.backbone, BACKBONES,
                                        "backbone")
  config.data.name = launch.choose(_DATASET.value or config.data.name, DATASETS, "dataset")
  if _DATA_DIR.value:
    config.data.data_dir = _DATA_DIR.value
  workdir = _WORKDIR.value or f"runs/deeplab_{config.model.backbone}_{config.data.name}"
  summary = segmentation.train_and_evaluate(config, workdir)
  keys = ("miou", "pixel_accuracy", "mean_dice", "steps", "train_seconds", "images_per_second")
  print(json.dumps({k: summary[k] for k in keys}))
  print(f"wrote {workdir}/summary.json, predictions.png, metrics.jsonl, checkpoints/")


if __name__ == "__main__":
  launch.run(main)
