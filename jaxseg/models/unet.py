"""The U-Net family: U-Net, Attention U-Net and a U-Net decoder on a backbone (ResNet-50).

- `UNet`: Ronneberger et al. 2015, "U-Net: Convolutional Networks for Biomedical Image
  Segmentation" (arXiv:1505.04597), with "same" padding so the output has the input size and
  BatchNorm after every conv by default. `attention=True` gives Oktay et al. 2018, "Attention
  U-Net: Learning Where to Look for the Pancreas" (arXiv:1804.03999).
- `BackboneUNet`: a U-Net decoder over a backbone's stage features (resnet50_unet), as
  segmentation_models_pytorch's Unet: nearest 2x upsampling, skip concatenation, two 3x3
  conv-BN-ReLU per level; the backbone lives under `backbone` so pretrained weights load.

Inputs whose size is not a multiple of the network's total stride are padded at the bottom and
right and the logits cropped back, so any size works.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.layers import (ConvBNAct, UpConv2x2, conv, conv_kernel_init, max_pool,
                           upsample2x_bilinear)

Dtype = Any


def _pad_to_multiple(x_bhwc, multiple: int):
  """Zero-pads H and W at the end up to a multiple; returns the padded array and (H, W)."""
  h, w = x_bhwc.shape[1:3]
  ph, pw = -h % multiple, -w % multiple
  if ph or pw:
    x_bhwc = jnp.pad(x_bhwc, ((0, 0), (0, ph), (0, pw), (0, 0)))
  return x_bhwc, (h, w)


class DoubleConv(nn.Module):
  """Two 3x3 convs + ReLU, BatchNorm after each conv when `batch_norm` (conv biases otherwise)."""

  features: int
  batch_norm: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    for i in (1, 2):
      if self.batch_norm:
        x = ConvBNAct(self.features, 3, dtype=self.dtype, name=f"conv{i}")(x, train=train)
      else:
        x = nn.relu(nn.Conv(self.features, (3, 3), padding=1, kernel_init=conv_kernel_init,
                            dtype=self.dtype, name=f"conv{i}")(x))
    return x


class AttentionGate(nn.Module):
  """Additive attention (Oktay et al. 2018, Fig. 2): weights the skip `x` by a map computed from
  `x` and the coarser decoder features `g` (half x's resolution).

  x is brought to g's grid by a 2x2 stride-2 conv, g by a 1x1 conv; relu(sum) -> 1x1 -> sigmoid
  gives alpha at g's resolution, upsampled bilinearly to x's; the gated skip x * alpha goes
  through a 1x1 conv + BN. alpha is sown as `intermediates/attention`.
  """

  inter_features: int
  batch_norm: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, g, *, train: bool):
    conv2d = functools.partial(conv, kernel_init=conv_kernel_init, dtype=self.dtype)
    theta_x = conv2d(self.inter_features, (2, 2), strides=2, use_bias=False, name="theta_x")(x)
    phi_g = conv2d(self.inter_features, (1, 1), name="phi_g")(g)
    alpha = nn.sigmoid(conv2d(1, (1, 1), name="psi")(nn.relu(theta_x + phi_g)))
    alpha = upsample2x_bilinear(alpha)
    self.sow("intermediates", "attention", alpha[..., 0])
    y = x * alpha
    if self.batch_norm:
      return ConvBNAct(x.shape[-1], 1, act=None, dtype=self.dtype, name="out")(y, train=train)
    return conv2d(x.shape[-1], (1, 1), name="out")(y)


class UNet(nn.Module):
  """U-Net (optionally with attention gates). Widths double from `features` each level down.

  With the defaults (depth 4, 64 features, no BatchNorm) it is the paper's network: 31,031,810
  parameters for 3 input channels and 2 classes.
  """

  num_classes: int
  features: int = 64
  depth: int = 4
  batch_norm: bool = True
  attention: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool):
    x, size = _pad_to_multiple(jnp.asarray(images, self.dtype), 2 ** self.depth)
    block = functools.partial(DoubleConv, batch_norm=self.batch_norm, dtype=self.dtype)
    skips = []
    for level in range(self.depth):
      x = block(self.features * 2 ** level, name=f"down{level}")(x, train=train)
      skips.append(x)
      x = max_pool(x, 2, 2)
    x = block(self.features * 2 ** self.depth, name="bottleneck")(x, train=train)
    for level in reversed(range(self.depth)):
      width = self.features * 2 ** level
      skip = skips[level]
      if self.attention:
        skip = AttentionGate(width // 2, self.batch_norm, self.dtype, name=f"gate{level}")(
            skip, x, train=train)
      x = UpConv2x2(width, dtype=self.dtype, name=f"upconv{level}")(x)
      x = block(width, name=f"up{level}")(jnp.concatenate([skip, x], axis=-1), train=train)
    x = conv(self.num_classes, (1, 1), dtype=self.dtype, name="classifier")(x)
    return x[:, :size[0], :size[1]]


AttentionUNet = functools.partial(UNet, attention=True)


def _upsample2x_nearest(x):
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class BackboneUNet(nn.Module):
  """U-Net decoder over a backbone's stage features (stride 32 -> 1).

  Each decoder level: nearest 2x upsampling, concatenation with the backbone feature of that
  stride (stage3, stage2, stage1, stem; none at full resolution), two 3x3 conv-BN-ReLU.
  """

  num_classes: int
  backbone: Callable[..., nn.Module]
  decoder_features: Sequence[int] = (256, 128, 64, 32, 16)
  dtype: Dtype = jnp.float32

  SKIPS = ("stage3", "stage2", "stage1", "stem", None)

  @nn.compact
  def __call__(self, images, *, train: bool):
    x, size = _pad_to_multiple(jnp.asarray(images, self.dtype), 32)
    features = self.backbone(output_stride=32, dtype=self.dtype, name="backbone")(x, train=train)
    x = features["stage4"]
    for i, (width, skip) in enumerate(zip(self.decoder_features, self.SKIPS)):
      x = _upsample2x_nearest(x)
      if skip is not None:
        x = jnp.concatenate([x, features[skip].astype(x.dtype)], axis=-1)
      x = DoubleConv(width, dtype=self.dtype, name=f"decoder{i}")(x, train=train)
    x = nn.Conv(self.num_classes, (3, 3), padding=1, dtype=self.dtype, name="classifier")(x)
    return x[:, :size[0], :size[1]]
