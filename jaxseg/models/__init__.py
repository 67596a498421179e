"""Segmentation models: a plain registry and one factory, `create_model`."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jaxseg import backbones
from jaxseg.errors import JaxsegError
from jaxseg.models.deeplab import ASPP, DeepLabV3Plus

# name -> (module class, whether it takes a `backbone`).
MODELS = {
    "deeplabv3plus": (DeepLabV3Plus, True),
}


def create_model(name: str, *, num_classes: int, backbone: str | None = None,
                 dtype: Any = jnp.float32, **kwargs):
  """Builds a registered model; the one place where config values become constructor args."""
  if name not in MODELS:
    raise JaxsegError(f"unknown model {name!r}; valid choices: {', '.join(sorted(MODELS))}")
  cls, takes_backbone = MODELS[name]
  if takes_backbone:
    kwargs["backbone"] = backbones.get_backbone(backbone or "resnet50")
  return cls(num_classes=num_classes, dtype=jnp.dtype(dtype), **kwargs)


__all__ = ["MODELS", "create_model", "ASPP", "DeepLabV3Plus"]
