"""Trains and evaluates a U-Net variant.

    python -m experiments.unet --variant=attention
    python -m experiments.unet --variant=resnet50 --config.model.pretrained=pretrained/r50

Writes WORKDIR/{metrics.jsonl, summary.json, predictions.png, checkpoints/, tensorboard/} and,
for the attention variant, attention.png; running it again resumes from WORKDIR.
"""

from absl import flags

from experiments import launch
from experiments.configs import unet as unet_config
from jaxseg.train import segmentation

_VARIANT = flags.DEFINE_string(
    "variant", "attention", f"One of {', '.join(unet_config.VARIANTS)}.")
_DATA = launch.DataFlags("runs/unet_VARIANT_DATASET")
_CONFIG = launch.define_config("config", unet_config.get_config(),
                               "Config overrides, e.g. --config.train.steps=100.")


def main():
  config = _CONFIG.value
  variant = launch.choose(_VARIANT.value, unet_config.VARIANTS, "variant")
  config.model.name = unet_config.VARIANTS[variant]
  if variant == "resnet50" and config.model.backbone is None:
    config.model.backbone = "resnet50"
  _DATA.apply(config)
  workdir = _DATA.workdir.value or f"runs/unet_{variant}_{config.data.name}"
  pictures = ("predictions.png", "attention.png") if variant == "attention" else (
      "predictions.png",)
  launch.report(segmentation.train_and_evaluate(config, workdir), workdir, pictures)


if __name__ == "__main__":
  launch.run(main)
