"""Xception (Chollet 2017, "Xception: Deep Learning with Depthwise Separable Convolutions"),
laid out as keras.applications.Xception so that Keras ImageNet weights map one to one.

Same topology and parameter count as Keras without the classifier (20,861,480 values including
the BatchNorm moving statistics). Keras conventions kept for weight parity: BN epsilon 1e-3,
"valid" padding in the first two convs, TF-style "SAME" padding (extra row/column at the end)
in strided layers, no conv biases.

Features: stem (block1, stride 2), stage1 (block2, stride 4), stage2 (block3, stride 8),
stage3 (block4-12, stride 16), stage4 (block13-14, stride 32). `output_stride` 16 or 8 runs the
strided entry/exit blocks with stride 1 and dilates every later 3x3 depthwise conv instead.

Parameter names follow Keras layer names: `block1_conv1/kernel`, `block1_conv1_bn/{scale,bias}`,
`block2_sepconv1/{depthwise,pointwise}`, `block2_sepconv1_bn`, `conv2d_{i}` for the residual
projections (Keras's `conv2d`, `conv2d_1`, ...) with `batch_normalization_{i}`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.layers import batch_norm, conv_kernel_init
from jaxseg.errors import JaxsegError

Dtype = Any
KERAS_BN_EPSILON = 1e-3


class KerasSeparableConv(nn.Module):
  """Keras SeparableConv2D without bias: depthwise 3x3 (dilated), then pointwise 1x1."""

  features: int
  dilation: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = nn.Conv(c, (3, 3), padding="SAME", kernel_dilation=self.dilation, feature_group_count=c,
                use_bias=False, kernel_init=conv_kernel_init, dtype=self.dtype,
                name="depthwise")(x)
    return nn.Conv(self.features, (1, 1), use_bias=False, kernel_init=conv_kernel_init,
                   dtype=self.dtype, name="pointwise")(x)


class Xception(nn.Module):
  """keras.applications.Xception trunk returning {"stem", "stage1".."stage4"}."""

  output_stride: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    if self.output_stride not in (8, 16, 32):
      raise JaxsegError(f"output_stride must be 8, 16 or 32, got {self.output_stride}")
    bn = batch_norm(train, self.dtype, momentum=0.99, epsilon=KERAS_BN_EPSILON)
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_kernel_init,
                             dtype=self.dtype)
    reduction, dilation, projection = 2, 1, 0

    def sep_bn(y, features, name):
      y = KerasSeparableConv(features, dilation, self.dtype, name=name)(y)
      return bn(name=f"{name}_bn")(y)

    def downsample(y, shortcut, features):
      """Block end: 3x3 max-pool (stride 2, or 1 past the output stride) + 1x1 projection."""
      nonlocal reduction, dilation, projection
      suffix = f"_{projection}" if projection else ""
      projection += 1
      stride = 2 if reduction * 2 <= self.output_stride else 1
      y = nn.max_pool(y, (3, 3), strides=(stride, stride), padding="SAME")
      shortcut = conv(features, (1, 1), strides=stride, padding="SAME",
                      name=f"conv2d{suffix}")(shortcut)
      shortcut = bn(name=f"batch_normalization{suffix}")(shortcut)
      if stride == 2:
        reduction *= 2
      else:
        dilation *= 2  # every later 3x3 sees the same field as in the strided network
      return y + shortcut

    x = jnp.asarray(x, self.dtype)
    x = conv(32, (3, 3), strides=2, padding="VALID", name="block1_conv1")(x)
    x = nn.relu(bn(name="block1_conv1_bn")(x))
    x = conv(64, (3, 3), padding="VALID", name="block1_conv2")(x)
    x = nn.relu(bn(name="block1_conv2_bn")(x))
    features = {"stem": x}

    # Entry flow: blocks 2-4, each two separable convs and a strided exit.
    for block, width, stage in ((2, 128, "stage1"), (3, 256, "stage2"), (4, 728, None)):
      y = x if block == 2 else nn.relu(x)  # Keras has no ReLU before block2_sepconv1
      y = sep_bn(y, width, f"block{block}_sepconv1")
      y = sep_bn(nn.relu(y), width, f"block{block}_sepconv2")
      x = downsample(y, x, width)
      if stage:
        features[stage] = x

    # Middle flow: blocks 5-12, three separable convs with an identity shortcut.
    for block in range(5, 13):
      y = x
      for i in (1, 2, 3):
        y = sep_bn(nn.relu(y), 728, f"block{block}_sepconv{i}")
      x = x + y
    features["stage3"] = x

    # Exit flow.
    y = sep_bn(nn.relu(x), 728, "block13_sepconv1")
    y = sep_bn(nn.relu(y), 1024, "block13_sepconv2")
    x = downsample(y, x, 1024)
    x = nn.relu(sep_bn(x, 1536, "block14_sepconv1"))
    x = nn.relu(sep_bn(x, 2048, "block14_sepconv2"))
    features["stage4"] = x
    return features
