"""Shared building blocks: conv + norm + activation, separable convs, resizing.

Every block takes a compute `dtype` and keeps its parameters in float32 (flax's default
`param_dtype`), so bf16 training needs no loss scaling and checkpoints are dtype independent.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
ModuleDef = Any

# He (fan-out) init, as torchvision/timm initialise the convs of ResNets.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(train: bool, dtype: Dtype, momentum: float = 0.9, epsilon: float = 1e-5, **kw):
  """BatchNorm partial: batch statistics in training, running averages in eval.

  Under `jax.jit` over a sharded batch the mean/variance are reductions over the *global*
  batch, so this is synchronised BN across devices without any axis name.
  momentum 0.9 here is torch's momentum 0.1 (flax weighs the old value).
  """
  return functools.partial(
      nn.BatchNorm, use_running_average=not train, momentum=momentum, epsilon=epsilon,
      dtype=dtype, **kw)


class ConvBNAct(nn.Module):
  """Conv (no bias) -> BatchNorm -> activation."""

  features: int
  kernel_size: int = 3
  strides: int = 1
  dilation: int = 1
  groups: int = 1
  act: Callable | None = nn.relu
  dtype: Dtype = jnp.float32
  bn_scale_init: Callable = nn.initializers.ones
  use_bias: bool = False  # Keras-trained networks have conv biases in front of their BN
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, *, train: bool):
    k = self.kernel_size
    # Symmetric "same" padding including dilation, as torch's padding=d*(k-1)//2; flax's "SAME"
    # pads asymmetrically for strided convs, which would misalign with converted weights.
    pad = self.dilation * (k - 1) // 2
    x = nn.Conv(self.features, (k, k), strides=self.strides, padding=[(pad, pad)] * 2,
                kernel_dilation=self.dilation, feature_group_count=self.groups,
                use_bias=self.use_bias, kernel_init=conv_kernel_init, dtype=self.dtype,
                name="conv")(x)
    x = batch_norm(train, self.dtype, epsilon=self.bn_epsilon,
                   scale_init=self.bn_scale_init)(name="bn")(x)
    return self.act(x) if self.act is not None else x


class SeparableConvBNAct(nn.Module):
  """Depthwise 3x3 (dilated) -> BN -> act -> pointwise 1x1 -> BN -> act (DeepLabV3+ style)."""

  features: int
  kernel_size: int = 3
  strides: int = 1
  dilation: int = 1
  act: Callable | None = nn.relu
  bn_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    conv = functools.partial(ConvBNAct, act=self.act, bn_epsilon=self.bn_epsilon,
                             dtype=self.dtype)
    x = conv(x.shape[-1], self.kernel_size, self.strides, self.dilation, groups=x.shape[-1],
             name="depthwise")(x, train=train)
    return conv(self.features, 1, name="pointwise")(x, train=train)


def resize_bilinear(x_bhwc: jax.Array, size: Sequence[int]) -> jax.Array:
  """Bilinear resize of the spatial dims, half-pixel centres (torch align_corners=False).

  No antialiasing: for upsampling (the only use in the decoders) it changes nothing, and it
  keeps downsampling consistent with torch's F.interpolate, which converted models expect.
  """
  b, _, _, c = x_bhwc.shape
  if tuple(x_bhwc.shape[1:3]) == tuple(size):
    return x_bhwc
  return jax.image.resize(x_bhwc, (b, *size, c), method="bilinear", antialias=False)


class UpConv2x2(nn.Module):
  """2x2, stride-2 transposed conv (U-Net's "up-convolution") as one einsum + depth-to-space.

  The kernel windows do not overlap, so every output pixel is one input pixel times one kernel
  tap: out[2i+a, 2j+b] = x[i, j] @ kernel[a, b] + bias. XLA:CPU runs this ~3x faster than
  `nn.ConvTranspose` (benchmarks/upsample.py) and it is exact. The kernel is laid out
  (2, 2, in, out) with torch's ConvTranspose2d orientation; flax's nn.ConvTranspose stores the
  same map with both spatial axes flipped.
  """

  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    kernel = self.param("kernel", conv_kernel_init, (2, 2, c, self.features), jnp.float32)
    y = jnp.einsum("bhwc,ijco->bhiwjo", x.astype(self.dtype), kernel.astype(self.dtype))
    y = y.reshape(b, 2 * h, 2 * w, self.features)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(
          self.dtype)
    return y


def upsample2x_bilinear(x_bhwc: jax.Array) -> jax.Array:
  """Exact 2x bilinear upsampling (half-pixel centres, edges clamped), as slices and adds.

  Equals `jax.image.resize(..., method="bilinear")` to 2x the size, which lowers to dense
  interpolation matrices; here each output pixel is 0.75 x nearest + 0.25 x next neighbour.
  """
  def along(x, axis):
    n = x.shape[axis]
    prev = jnp.concatenate([jax.lax.slice_in_dim(x, 0, 1, axis=axis),
                            jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)
    nxt = jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis),
                           jax.lax.slice_in_dim(x, n - 1, n, axis=axis)], axis=axis)
    even, odd = 0.75 * x + 0.25 * prev, 0.75 * x + 0.25 * nxt
    stacked = jnp.stack([even, odd], axis=axis + 1)
    return stacked.reshape(*x.shape[:axis], 2 * n, *x.shape[axis + 1:])

  return along(along(x_bhwc, 1), 2)
