"""ResNet-50/101 trunks (He et al. 2016), bottleneck v1.5 as in torchvision.

v1.5 puts the stride of a downsampling bottleneck on its 3x3 conv (torchvision, timm "resnet50"),
not on the first 1x1 (the original paper, Keras). `output_stride` 8/16 turns the strides of the
last stages into dilation, as DeepLab does, without changing any parameter shape or name.

Parameter names are a contract: the weight converters (jaxseg.weights) map onto them.

    stem/conv/kernel (7, 7, 3, 64)      stem/bn/{scale,bias}        torchvision: conv1, bn1
    stage{s}/block{j}/conv{i}/conv/kernel  .../conv{i}/bn/{scale,bias}   layer{s}.{j}.conv{i}, bn{i}
    stage{s}/block{j}/downsample/conv/kernel  .../downsample/bn/...   layer{s}.{j}.downsample.{0,1}

with s = 1..4, j = 0..n-1 and i = 1..3 (BatchNorm running statistics live under the same paths
in the `batch_stats` collection as `mean` / `var`). The classifier (fc) is not part of the trunk.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.layers import ConvBNAct, max_pool
from jaxseg.errors import JaxsegError

Dtype = Any

STAGE_WIDTHS = (64, 128, 256, 512)  # bottleneck widths; outputs are 4x these

# "torchvision": v1.5, stride on the 3x3, no conv biases, BN eps 1e-5.
# "keras": keras.applications.ResNet50/101 (v1), stride on the first 1x1, conv biases,
# BN eps 1.001e-5; needed for Keras ImageNet weights to give the same features.
STYLES = {"torchvision": dict(stride_on_1x1=False, use_bias=False, bn_epsilon=1e-5),
          "keras": dict(stride_on_1x1=True, use_bias=True, bn_epsilon=1.001e-5)}


class Bottleneck(nn.Module):
  """1x1 reduce -> 3x3 (strided, dilated) -> 1x1 expand, plus identity or projection."""

  width: int
  strides: int = 1
  dilation: int = 1
  zero_init_last: bool = True
  style: str = "torchvision"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    style = STYLES[self.style]
    conv = functools.partial(ConvBNAct, dtype=self.dtype, use_bias=style["use_bias"],
                             bn_epsilon=style["bn_epsilon"])
    out_features = self.width * 4
    s1, s3 = (self.strides, 1) if style["stride_on_1x1"] else (1, self.strides)
    y = conv(self.width, 1, s1, name="conv1")(x, train=train)
    y = conv(self.width, 3, s3, self.dilation, name="conv2")(y, train=train)
    # The last BN starts at zero so every residual block begins as the identity: deep
    # ResNets trained from scratch converge much faster (Goyal et al. 2017).
    y = conv(out_features, 1, act=None,
             bn_scale_init=nn.initializers.zeros if self.zero_init_last
             else nn.initializers.ones, name="conv3")(y, train=train)
    if x.shape[-1] != out_features or self.strides != 1:
      x = conv(out_features, 1, self.strides, act=None, name="downsample")(x, train=train)
    return nn.relu(x + y)


class ResNetStage(nn.Module):
  """A stack of bottlenecks; only the first one strides."""

  num_blocks: int
  width: int
  strides: int
  dilations: Sequence[int]
  zero_init_last: bool = True
  style: str = "torchvision"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    for j in range(self.num_blocks):
      x = Bottleneck(self.width, self.strides if j == 0 else 1, self.dilations[j],
                     self.zero_init_last, self.style, self.dtype, name=f"block{j}")(
                         x, train=train)
    return x


def stage_plan(stage_sizes: Sequence[int], output_stride: int = 32,
               multi_grid: Sequence[int] | None = None):
  """Per stage (strides, per-block dilations, reduction) for a target output stride.

  Once the running reduction would pass `output_stride`, a stage keeps stride 1 and multiplies
  the dilation instead. As in torchvision, the first block of a newly dilated stage still uses
  the previous dilation; with DeepLab's multi-grid the last stage's blocks use
  dilation * multi_grid[j] (DeepLabV3 Sec. 3.2: rates 2 * (1, 2, 4) at output stride 16).
  """
  if output_stride not in (8, 16, 32):
    raise JaxsegError(f"output_stride must be 8, 16 or 32, got {output_stride}")
  plan, reduction, dilation = [], 4, 1  # the stem reduces by 4 (conv s2 + max-pool s2)
  for s, n in enumerate(stage_sizes):
    strides = 1 if s == 0 else 2
    previous = dilation
    if reduction * strides > output_stride:
      dilation, strides = dilation * strides, 1
    else:
      reduction *= strides
    if multi_grid is not None and s == len(stage_sizes) - 1:
      if len(multi_grid) != n:
        raise JaxsegError(f"multi_grid {tuple(multi_grid)} needs one rate per block of the "
                         f"last stage ({n})")
      dilations = tuple(dilation * g for g in multi_grid)
    else:
      dilations = (previous,) + (dilation,) * (n - 1)
    plan.append((strides, dilations, reduction))
  return plan


def feature_info(stage_sizes: Sequence[int], output_stride: int = 32, width: int = 64):
  """{name: (channels, reduction)} of the feature dict returned by `ResNet`."""
  info = {"stem": (width, 2)}
  for s, (_, _, reduction) in enumerate(stage_plan(stage_sizes, output_stride)):
    info[f"stage{s + 1}"] = (STAGE_WIDTHS[s] * width // 64 * 4, reduction)
  return info


class ResNet(nn.Module):
  """ResNet trunk returning {"stem", "stage1".."stage4"} features (no classifier).

  `width` scales every layer (64 is the standard network; tests use narrow ones).
  """

  stage_sizes: Sequence[int]
  width: int = 64
  output_stride: int = 32
  multi_grid: Sequence[int] | None = None
  zero_init_last: bool = True
  style: str = "torchvision"  # or "keras" (see STYLES)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    if self.style not in STYLES:
      raise JaxsegError(f"unknown ResNet style {self.style!r}; valid: {', '.join(STYLES)}")
    x = jnp.asarray(x, self.dtype)
    x = ConvBNAct(self.width, 7, 2, dtype=self.dtype, use_bias=STYLES[self.style]["use_bias"],
                  bn_epsilon=STYLES[self.style]["bn_epsilon"], name="stem")(x, train=train)
    features = {"stem": x}  # stride 2, before the max-pool (U-Net decoders use it as a skip)
    x = max_pool(x, 3, 2, padding=((1, 1), (1, 1)))
    plan = stage_plan(self.stage_sizes, self.output_stride, self.multi_grid)
    for s, (strides, dilations, _) in enumerate(plan):
      x = ResNetStage(self.stage_sizes[s], STAGE_WIDTHS[s] * self.width // 64, strides,
                      dilations, self.zero_init_last, self.style, self.dtype,
                      name=f"stage{s + 1}")(x, train=train)
      features[f"stage{s + 1}"] = x
    return features


ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3))
