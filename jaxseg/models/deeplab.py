"""DeepLabV3+ (Chen et al. 2018, "Encoder-Decoder with Atrous Separable Convolution for
Semantic Image Segmentation", arXiv:1802.02611).

Encoder: a backbone at output stride 16 (or 8) followed by ASPP. Decoder: the stride-4 features
projected to 48 channels, concatenated with the 4x-upsampled ASPP output, two 3x3 convs of 256
and a 1x1 classifier; the logits are bilinearly resized to the input size.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.layers import ConvBNAct, SeparableConvBNAct, conv, resize_bilinear

Dtype = Any

# ASPP rates per output stride: the paper's (6, 12, 18) at 16, doubled at 8 (Sec. 4.1).
ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}


class ASPP(nn.Module):
  """Atrous spatial pyramid pooling: 1x1, three atrous 3x3 and image pooling, then 1x1 fuse."""

  features: int = 256
  rates: Sequence[int] = (6, 12, 18)
  separable: bool = False
  dropout_rate: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    branches = [ConvBNAct(self.features, 1, dtype=self.dtype, name="conv1x1")(x, train=train)]
    for i, rate in enumerate(self.rates):
      block = SeparableConvBNAct if self.separable else ConvBNAct
      branches.append(block(self.features, 3, dilation=rate, dtype=self.dtype,
                            name=f"atrous{i + 1}")(x, train=train))
    # Image-level features: global average -> 1x1 conv -> BN -> ReLU, broadcast back (the
    # bilinear upsampling of a 1x1 map is a broadcast).
    pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
    pooled = ConvBNAct(self.features, 1, dtype=self.dtype, name="pool")(pooled, train=train)
    branches.append(jnp.broadcast_to(pooled, (*x.shape[:3], self.features)))
    x = jnp.concatenate(branches, axis=-1)
    x = ConvBNAct(self.features, 1, dtype=self.dtype, name="project")(x, train=train)
    return nn.Dropout(self.dropout_rate, deterministic=not train)(x)


class DeepLabV3Plus(nn.Module):
  """DeepLabV3+ over any backbone that returns stage features."""

  num_classes: int
  backbone: Callable[..., nn.Module]
  output_stride: int = 16
  multi_grid: Sequence[int] | None = None  # DeepLabV3's unit rates for the last stage
  aspp_rates: Sequence[int] | None = None
  aspp_features: int = 256
  low_level_stage: str = "stage1"
  low_level_features: int = 48
  decoder_features: int = 256
  separable: bool = False
  dropout_rate: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool):
    extra = {"multi_grid": tuple(self.multi_grid)} if self.multi_grid else {}
    features = self.backbone(output_stride=self.output_stride, dtype=self.dtype, **extra,
                             name="backbone")(images, train=train)
    rates = self.aspp_rates or ASPP_RATES[self.output_stride]
    x = ASPP(self.aspp_features, rates, self.separable, self.dropout_rate, self.dtype,
             name="aspp")(features["stage4"], train=train)
    low = features[self.low_level_stage]
    low = ConvBNAct(self.low_level_features, 1, dtype=self.dtype, name="low_level")(
        low, train=train)
    x = resize_bilinear(x, low.shape[1:3])
    x = jnp.concatenate([x, low], axis=-1)
    block = SeparableConvBNAct if self.separable else ConvBNAct
    x = block(self.decoder_features, 3, dtype=self.dtype, name="decoder1")(x, train=train)
    x = block(self.decoder_features, 3, dtype=self.dtype, name="decoder2")(x, train=train)
    x = conv(self.num_classes, (1, 1), dtype=self.dtype, name="classifier")(x)
    return resize_bilinear(x, images.shape[1:3])
