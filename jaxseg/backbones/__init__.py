"""Backbones: each returns a dict of stage features {"stem", "stage1".."stage4"}."""

from __future__ import annotations

from jaxseg.backbones import inception, resnet, xception
from jaxseg.backbones.inception import InceptionV3
from jaxseg.backbones.resnet import ResNet, ResNet50, ResNet101
from jaxseg.backbones.xception import Xception, Xception65
from jaxseg.errors import JaxsegError

# name -> module factory; every factory accepts output_stride=, dtype= and returns a
# module whose __call__(images, *, train) gives the stage-feature dict.
BACKBONES = {
    "resnet50": ResNet50,
    "resnet101": ResNet101,
    "xception": Xception,
    "xception65": Xception65,
    "inception_v3": InceptionV3,  # for FID/KID features (output stride 32 only)
}


# Registered for weight conversion and FID features only: no output stride but 32, and "valid"
# convolutions, so no segmentation model is built on them.
FEATURES_ONLY = frozenset({"inception_v3"})


def segmentation_backbones() -> list[str]:
  """The backbones a segmentation model (DeepLab, U-Net) can be built on, sorted."""
  return sorted(set(BACKBONES) - FEATURES_ONLY)


def get_backbone(name: str):
  """The backbone factory registered under `name` (a partial of a linen module)."""
  if name not in BACKBONES:
    raise JaxsegError(f"unknown backbone {name!r}; valid choices: {', '.join(sorted(BACKBONES))}")
  return BACKBONES[name]


__all__ = ["BACKBONES", "FEATURES_ONLY", "get_backbone", "segmentation_backbones", "inception",
           "resnet", "xception", "InceptionV3", "ResNet", "ResNet50", "ResNet101", "Xception",
           "Xception65"]
