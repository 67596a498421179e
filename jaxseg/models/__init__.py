"""Segmentation models: a plain registry and one factory, `create_model`."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax.numpy as jnp

from jaxseg import backbones
from jaxseg.errors import JaxsegError
from jaxseg.models.deeplab import ASPP, DeepLabV3Plus
from jaxseg.models.unet import AttentionUNet, BackboneUNet, UNet

# name -> (module class, whether it takes a `backbone`).
MODELS = {
    "deeplabv3plus": (DeepLabV3Plus, True),
    "unet": (UNet, False),
    "attention_unet": (AttentionUNet, False),
    "resnet50_unet": (BackboneUNet, True),  # any registered backbone; resnet50 by default
}


def create_model(name: str, *, num_classes: int, backbone: str | None = None,
                 backbone_kwargs: dict | None = None, dtype: Any = jnp.float32, **kwargs):
  """Builds a registered model from plain arguments (jaxseg.train.build passes a config's).

  `backbone_kwargs` fix backbone constructor arguments (e.g. a pretrained checkpoint's
  `style="keras"`), on top of the output stride and dtype the model passes itself.
  """
  if name not in MODELS:
    raise JaxsegError(f"unknown model {name!r}; valid choices: {', '.join(sorted(MODELS))}")
  cls, takes_backbone = MODELS[name]
  fields = {f.name for f in dataclasses.fields(getattr(cls, "func", cls))}
  for key in kwargs:
    if key not in fields:
      raise JaxsegError(f"--config.model.{key} does not apply to model {name}")
  if backbone is not None and not takes_backbone:
    raise JaxsegError(f"model {name} has no backbone (--config.model.backbone={backbone})")
  if takes_backbone:
    factory = backbones.get_backbone(backbone or "resnet50")
    kwargs["backbone"] = functools.partial(factory, **backbone_kwargs) if backbone_kwargs else (
        factory)
  return cls(num_classes=num_classes, dtype=jnp.dtype(dtype), **kwargs)


__all__ = ["MODELS", "create_model", "ASPP", "DeepLabV3Plus", "UNet", "AttentionUNet",
           "BackboneUNet"]
