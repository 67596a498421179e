"""Trains and evaluates DeepLabV3+.

    python -m experiments.deeplab --backbone=resnet101
    python -m experiments.deeplab --backbone=resnet50 --workdir=runs/r50 --config.train.steps=50

Writes WORKDIR/{metrics.jsonl, summary.json, predictions.png, checkpoints/, tensorboard/};
running the same command again resumes from WORKDIR's latest checkpoint.
"""

from absl import flags

from experiments import launch
from experiments.configs import deeplab as deeplab_config
from jaxseg.backbones import segmentation_backbones
from jaxseg.train import segmentation

_BACKBONE = flags.DEFINE_string(
    "backbone", None, f"Encoder: one of {', '.join(segmentation_backbones())} (default: the config's, "
    "resnet101).")
_DATA = launch.DataFlags("runs/deeplab_BACKBONE_DATASET")
_CONFIG = launch.define_config("config", deeplab_config.get_config(),
                               "Config overrides, e.g. --config.train.steps=100.")


def main():
  config = _CONFIG.value
  # The selector flags win over --config.model.backbone / --config.data.name when given.
  config.model.backbone = launch.choose(_BACKBONE.value or config.model.backbone,
                                        segmentation_backbones(), "backbone")
  _DATA.apply(config)
  workdir = _DATA.workdir.value or f"runs/deeplab_{config.model.backbone}_{config.data.name}"
  launch.report(segmentation.train_and_evaluate(config, workdir), workdir)


if __name__ == "__main__":
  launch.run(main)
