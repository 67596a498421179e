"""Segmentation models: a plain registry and one factory, `create_model`."""

from __future__ import annotations

import functools
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
                 backbone_kwargs: dict | None = None, dtype: Any = jnp.float32, **kwargs):
  """Builds a registered model; the one place where config values become constructor args.

  `backbone_kwargs` fix backbone constructor arguments (e.g. a pretrained checkpoint's
  `style="keras"`), on top of the output stride and dtype the model passes itself.
  """
  if name not in MODELS:
    raise JaxsegError(f"unknown model {name!r}; valid choices: {', '.join(sorted(MODELS))}")
  cls, takes_backbone = MODELS[name]
  if takes_backbone:
    factory = backbones.get_backbone(backbone or "resnet50")
    kwargs["backbone"] = functools.partial(factory, **backbone_kwargs) if backbone_kwargs else (
        factory)
  return cls(num_classes=num_classes, dtype=jnp.dtype(dtype), **kwargs)


__all__ = ["MODELS", "create_model", "ASPP", "DeepLabV3Plus"]
