"""Xception backbones: the ImageNet Xception of Keras, and the aligned Xception-65 of DeepLabV3+.

`Xception` (Chollet 2017, "Xception: Deep Learning with Depthwise Separable Convolutions") is
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

timm's `legacy_xception` (Cadene's port of the Keras weights) is the same network with torch
conventions: `Xception(pool_padding="torch", bn_epsilon=1e-5)`.

`Xception65` is the aligned Xception-65 (Chen et al. 2018, arXiv:1802.02611, Sec. 3.3) as in
TF DeepLab and timm's `xception65` (see its docstring).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.layers import (ConvBNAct, DepthwiseConv, SeparableConvBNAct, batch_norm, conv,
                           conv_kernel_init, max_pool)
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
    # Stride 1 and an odd kernel: Keras's "same" is `dilation` pixels on every side.
    x = DepthwiseConv(3, dilation=self.dilation, padding=self.dilation, dtype=self.dtype,
                      name="depthwise")(x)
    return conv(self.features, (1, 1), use_bias=False, kernel_init=conv_kernel_init,
                dtype=self.dtype, name="pointwise")(x)


class Xception(nn.Module):
  """keras.applications.Xception trunk returning {"stem", "stage1".."stage4"}."""

  output_stride: int = 32
  # "tf": Keras's max-pool padding ("SAME": the extra row/column at the end); "torch": one pixel
  # on each side, as timm's legacy_xception port pools. They differ on every strided block.
  pool_padding: str = "tf"
  bn_epsilon: float = KERAS_BN_EPSILON
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    if self.output_stride not in (8, 16, 32):
      raise JaxsegError(f"output_stride must be 8, 16 or 32, got {self.output_stride}")
    if self.pool_padding not in ("tf", "torch"):
      raise JaxsegError(f"pool_padding must be 'tf' or 'torch', got {self.pool_padding!r}")
    # Keras's BN epsilon (it changes the features, so parity needs it) but jaxseg's running-
    # average momentum 0.9: Keras's 0.99 averages over ~100 steps, and after a short run the
    # running statistics were so stale that val mIoU fell from 0.75 (batch statistics) to 0.21.
    bn = batch_norm(train, self.dtype, epsilon=self.bn_epsilon)
    conv2d = functools.partial(conv, use_bias=False, kernel_init=conv_kernel_init,
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
      padding = "SAME" if self.pool_padding == "tf" else ((1, 1), (1, 1))
      y = max_pool(y, 3, stride, padding=padding)
      shortcut = conv2d(features, (1, 1), strides=stride, padding="SAME",
                        name=f"conv2d{suffix}")(shortcut)
      shortcut = bn(name=f"batch_normalization{suffix}")(shortcut)
      if stride == 2:
        reduction *= 2
      else:
        dilation *= 2  # every later 3x3 sees the same field as in the strided network
      return y + shortcut

    x = jnp.asarray(x, self.dtype)
    x = conv2d(32, (3, 3), strides=2, padding="VALID", name="block1_conv1")(x)
    x = nn.relu(bn(name="block1_conv1_bn")(x))
    x = conv2d(64, (3, 3), padding="VALID", name="block1_conv2")(x)
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


XCEPTION65_BN_EPSILON = 1e-3  # TF DeepLab's, kept by timm


class XceptionModule(nn.Module):
  """Three separable convs (the last one strided) plus a 1x1 projection or identity shortcut.

  `start_with_relu`: ReLU in front of each separable conv and none inside it (entry, middle and
  the first exit block); otherwise BN + ReLU after both the depthwise and the pointwise conv (the
  last exit block). Also returns the ReLU'd input of the third conv: the pre-stride features that
  DeepLab's decoder and timm's feature maps tap.
  """

  features: Sequence[int]
  strides: int = 1
  dilation: int = 1
  start_with_relu: bool = True
  skip: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    sep = functools.partial(SeparableConvBNAct, dilation=self.dilation,
                            act=None if self.start_with_relu else nn.relu,
                            bn_epsilon=XCEPTION65_BN_EPSILON, dtype=self.dtype)
    y, tap = x, None
    for i, features in enumerate(self.features):
      if self.start_with_relu:
        y = nn.relu(y)
      if i == 2:
        tap = y if self.start_with_relu else nn.relu(y)
      y = sep(features, strides=self.strides if i == 2 else 1, name=f"sepconv{i + 1}")(
          y, train=train)
    if not self.skip:
      return y, tap
    if x.shape[-1] != self.features[-1] or self.strides != 1:
      x = ConvBNAct(self.features[-1], 1, self.strides, act=None,
                    bn_epsilon=XCEPTION65_BN_EPSILON, dtype=self.dtype, name="shortcut")(
                        x, train=train)
    return y + x, tap


# (output channels of the three separable convs, stride) per block: entry flow (3 blocks),
# middle flow (16), exit flow (2). 1 + 1 + 21 * 3 = 65 layers of weights with the stem.
XCEPTION65_BLOCKS = ((128,) * 3, 2), ((256,) * 3, 2), ((728,) * 3, 2), *(((728,) * 3, 1),) * 16, (
    (728, 1024, 1024), 2), ((1536, 1536, 2048), 1)


class Xception65(nn.Module):
  """Aligned Xception-65 (DeepLabV3+'s backbone; timm `xception65`), stage-feature contract.

  Against Xception: 16 middle blocks instead of 8, every max-pool replaced by a strided
  separable conv, and BatchNorm after every depthwise conv (with ReLU too in the last block,
  as TF DeepLab and timm build it). Torch-style symmetric padding, BN epsilon 1e-3.

  Features follow timm's feature taps, the inputs of each strided conv: stem (block0, 128
  channels, stride 2), stage1 (block1, 256, 4; DeepLab's low-level features), stage2 (block2,
  728, 8), stage3 (block19, 1024, 16) and stage4 (the final 2048-channel map, 32). Beyond the
  output stride, a strided block runs with stride 1 and every later block is dilated.

  Parameter names follow timm's keys: `stem1`/`stem2` = `stem.{0,1}`; `block{i}/sepconv{k}/
  {depthwise,pointwise}/{conv,bn}` = `blocks.{i}.stack.conv{k}.{conv_dw,bn_dw,conv_pw,bn_pw}`;
  `block{i}/shortcut/{conv,bn}` = `blocks.{i}.shortcut.{conv,bn}`.
  """

  output_stride: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    if self.output_stride not in (8, 16, 32):
      raise JaxsegError(f"output_stride must be 8, 16 or 32, got {self.output_stride}")
    conv_bn = functools.partial(ConvBNAct, bn_epsilon=XCEPTION65_BN_EPSILON, dtype=self.dtype)
    x = jnp.asarray(x, self.dtype)
    x = conv_bn(32, 3, 2, name="stem1")(x, train=train)
    x = conv_bn(64, 3, 1, name="stem2")(x, train=train)
    features, reduction, dilation = {}, 2, 1
    taps = iter(("stem", "stage1", "stage2", "stage3"))
    last = len(XCEPTION65_BLOCKS) - 1
    for i, (widths, strides) in enumerate(XCEPTION65_BLOCKS):
      block_dilation = dilation
      if strides > 1:
        if reduction * strides > self.output_stride:
          dilation, strides = dilation * strides, 1  # this block keeps its dilation
        else:
          reduction *= strides
      x, tap = XceptionModule(widths, strides, block_dilation, start_with_relu=i != last,
                              skip=i != last, dtype=self.dtype, name=f"block{i}")(x, train=train)
      if XCEPTION65_BLOCKS[i][1] > 1:
        features[next(taps)] = tap
    features["stage4"] = x
    return features
