"""Trains and evaluates a U-Net variant.

    python -m experiments.unet --variant=attention
    python -m experiments.unet --variant=resnet50 --config.model.pretrained=pretrained/r50

Writes WORKDIR/{metrics.jsonl, summary.json, predictions.png, checkpoints/, tensorboard/} and,
for the attention variant, attention.png; running it again resumes from WORKDIR.
"""

import json

from absl import flags

from experiments import launch
from experiments.configs import unet as unet_config
from jaxseg.data import DATASETS
from jaxseg.train import segmentation

_VARIANT = flags.DEFINE_string(
    "variant", "attention", f"One of {', '.join(unet_config.VARIANTS)}.")
_DATASET = flags.DEFINE_string(
    "dataset", None, f"Dataset: one of {', '.join(sorted(DATASETS))} (default: the config's, "
    "synthetic).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Root of the dataset on disk.")
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Output directory (default runs/unet_VARIANT_DATASET).")
_CONFIG = launch.define_config("config", unet_config.get_config(),
                               "Config overrides, e.g. --config.train.steps=100.")


def main():
  config = _CONFIG.value
  variant = launch.choose(_VARIANT.value, unet_config.VARIANTS, "variant")
  config.model.name = unet_config.VARIANTS[variant]
  if variant == "resnet50" and config.model.backbone is None:
    config.model.backbone = "resnet50"
  config.data.name = launch.choose(_DATASET.value or config.data.name, DATASETS, "dataset")
  if _DATA_DIR.value:
    config.data.data_dir = _DATA_DIR.value
  workdir = _WORKDIR.value or f"runs/unet_{variant}_{config.data.name}"
  summary = segmentation.train_and_evaluate(config, workdir)
  keys = ("miou", "pixel_accuracy", "mean_dice", "steps", "train_seconds", "images_per_second")
  print(json.dumps({k: summary[k] for k in keys}))
  extra = ", attention.png" if variant == "attention" else ""
  print(f"wrote {workdir}/summary.json, predictions.png{extra}, metrics.jsonl, checkpoints/")


if __name__ == "__main__":
  launch.run(main)
