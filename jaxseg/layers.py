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
import numpy as np

from jaxseg import norm

Dtype = Any
ModuleDef = Any

# He (fan-out) init, as torchvision/timm initialise the convs of ResNets.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(train: bool, dtype: Dtype, momentum: float = 0.9, epsilon: float = 1e-5, **kw):
  """BatchNorm partial: batch statistics in training, running averages in eval.

  `norm.BatchNorm`: flax's BatchNorm, with its sums as dots on CPU. Under `jax.jit` over a
  sharded batch the mean/variance are sums over the *global* batch, so this is synchronised BN
  across devices without any axis name. momentum 0.9 here is torch's momentum 0.1 (flax
  weighs the old value).
  """
  return functools.partial(
      norm.BatchNorm, use_running_average=not train, momentum=momentum, epsilon=epsilon,
      dtype=dtype, **kw)


def max_pool(x_bhwc: jax.Array, window: int, strides: int,
             padding: str | Sequence[tuple[int, int]] = "VALID") -> jax.Array:
  """`nn.max_pool` with explicit pads written as a -inf `jnp.pad` and a VALID window.

  The same numbers (flax pads max-pools with -inf too), in the one form ONNX converters map to
  MaxPool: jax2onnx's max-pool binding takes `window_shape` by keyword and drops explicit pad
  pairs (a ResNet stem's 56x56 came out 55x55). `jaxseg.export` relies on this."""
  if not isinstance(padding, str):
    x_bhwc = jnp.pad(x_bhwc, ((0, 0), *map(tuple, padding), (0, 0)), constant_values=-jnp.inf)
    padding = "VALID"
  return nn.max_pool(x_bhwc, window_shape=(window, window), strides=(strides, strides),
                     padding=padding)


def _image_taps(k: int, size: int, strides: int, dilation: int, padding: int):
  """(output length, the taps along one axis through which some output reads a real pixel).
  Tap i reads input o * strides - padding + i * dilation for outputs o in [0, out); the
  others (a dilation wider than the map) only ever read padding and add zeros."""
  out = (size + 2 * padding - dilation * (k - 1) - 1) // strides + 1
  return out, [i for i in range(k) if i * dilation - padding + (out - 1) * strides >= 0
               and i * dilation - padding < size]


def _depthwise_taps(x_bhwc, k: int, strides: int, dilation: int, padding: int):
  """[(i, j, slice of the padded input that tap (i, j) reads)] over the taps that read the
  image (`_image_taps`)."""
  b, h, w, c = x_bhwc.shape
  out_h, rows = _image_taps(k, h, strides, dilation, padding)
  out_w, cols = _image_taps(k, w, strides, dilation, padding)
  x = jnp.pad(x_bhwc, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  taps = []
  for i in rows:
    for j in cols:
      taps.append((i, j, jax.lax.slice(
          x, (0, i * dilation, j * dilation, 0),
          (b, i * dilation + (out_h - 1) * strides + 1,
           j * dilation + (out_w - 1) * strides + 1, c), (1, strides, strides, 1))))
  return taps, (b, out_h, out_w, c)


def _depthwise_sum(x_bhwc, kernel_hw1c, strides, dilation, padding):
  taps, out_shape = _depthwise_taps(x_bhwc, kernel_hw1c.shape[0], strides, dilation, padding)
  out = jnp.zeros(out_shape, x_bhwc.dtype)
  for i, j, tap in taps:
    out = out + tap * kernel_hw1c[i, j, 0]
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def depthwise_conv(x_bhwc: jax.Array, kernel_hw1c: jax.Array, strides: int = 1,
                   dilation: int = 1, padding: int = 0) -> jax.Array:
  """Depthwise conv (one k x k filter per channel) as a sum of shifted, scaled slices.

  The same map as `lax.conv_general_dilated(..., feature_group_count=C)` with `padding`
  pixels of zeros on every side. XLA:CPU runs grouped convolutions, and above all their filter
  gradient, one channel at a time: for DeepLab's dilated 3x3 over 2048 channels this is 10-30x
  faster (forward + backward, `benchmarks/depthwise.py`). The input gradient is autodiff's
  (slices transpose to pads); the filter gradient, per tap a sum over (batch, height, width)
  of input x output gradient, is written out so that the sums are `norm.sum_rows` dots: left
  to autodiff, XLA:CPU fused each tap's sum with a re-computation of the input's producers
  (BatchNorm, ReLU), nine times over.
  """
  return _depthwise_sum(x_bhwc, kernel_hw1c, strides, dilation, padding)


def _depthwise_fwd(x_bhwc, kernel_hw1c, strides, dilation, padding):
  return (_depthwise_sum(x_bhwc, kernel_hw1c, strides, dilation, padding),
          (x_bhwc, kernel_hw1c))


def _depthwise_bwd(strides, dilation, padding, residuals, dy):
  x_bhwc, kernel_hw1c = residuals
  _, x_vjp = jax.vjp(lambda x: _depthwise_sum(x, kernel_hw1c, strides, dilation, padding),
                     x_bhwc)
  taps, _ = _depthwise_taps(x_bhwc, kernel_hw1c.shape[0], strides, dilation, padding)
  c = x_bhwc.shape[-1]
  dkernel = jnp.zeros(kernel_hw1c.shape, jnp.float32)
  for i, j, tap in taps:
    dkernel = dkernel.at[i, j, 0].set(norm.sum_rows((tap * dy).reshape(-1, c)))
  return x_vjp(dy)[0], dkernel.astype(kernel_hw1c.dtype)


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


class DilatedConv(nn.Module):
  """A dilated k x k conv with the parameters of `nn.Conv(features, (k, k))` and symmetric
  `padding`, leaving out the kernel rows and columns that only ever read padding: at output
  stride 16 on small inputs, ASPP's rate-18 taps fall outside a 16x16 map, and all but the
  centre are zeros times weights (exact; their gradients are zero either way)."""

  features: int
  kernel_size: int = 3
  strides: int = 1
  dilation: int = 1
  padding: int = 0
  use_bias: bool = False
  kernel_init: Callable = nn.linear.default_kernel_init
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x):
    k, d, p, s = self.kernel_size, self.dilation, self.padding, self.strides
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features),
                        jnp.float32)
    bias = (self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    pads = []
    for axis, size in ((0, x.shape[1]), (1, x.shape[2])):
      used = _image_taps(k, size, s, d, p)[1]
      lo, hi = (used[0], used[-1] + 1) if used else (0, k)
      low, high = p - lo * d, p - (k - hi) * d
      if low < 0 or high < 0:  # keeping the taps is simpler than cropping the input
        lo, hi, low, high = 0, k, p, p
      kernel = jax.lax.slice_in_dim(kernel, lo, hi, axis=axis)
      pads.append((low, high))
    y = jax.lax.conv_general_dilated(x, kernel, (s, s), pads, rhs_dilation=(d, d),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias if bias is not None else y


class PointwiseConv(nn.Module):
  """A 1x1 conv with the parameters of `nn.Conv(features, (1, 1))` ("kernel" (1, 1, C,
  features), optional "bias") as one matrix product over all pixels (a stride keeps every
  s-th pixel first). XLA:CPU lowers a 1x1 `conv_general_dilated`'s filter gradient to a
  convolution over the whole map that needs transposed copies of both inputs; as a dot, train
  steps at 64-128 px maps run 1.2-1.7x faster (benchmarks/RESULTS.md)."""

  features: int
  strides: int = 1
  use_bias: bool = True
  kernel_init: Callable = nn.linear.default_kernel_init
  bias_init: Callable = nn.initializers.zeros
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x):
    if self.strides > 1:
      x = x[:, ::self.strides, ::self.strides]
    c = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (1, 1, c, self.features), jnp.float32)
    bias = (self.param("bias", self.bias_init, (self.features,), jnp.float32)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jnp.dot(x.reshape(-1, c), kernel.reshape(c, self.features))
    y = y.reshape(*x.shape[:-1], self.features)
    return y + bias if bias is not None else y


def conv(features: int, kernel_size: Sequence[int], strides: int | Sequence[int] = 1,
         padding: Any = "SAME", **kw) -> nn.Module:
  """`nn.Conv(features, kernel_size, strides, padding, **kw)`, or the same parameters as a
  `PointwiseConv` when it is a plain 1x1 conv: no padding and one group (a 1x1 kernel's
  dilation changes nothing)."""
  strides_hw = (strides, strides) if isinstance(strides, int) else tuple(strides)
  no_padding = padding in ("SAME", "VALID", 0) or (
      isinstance(padding, (list, tuple)) and all(tuple(p) == (0, 0) for p in padding))
  if (tuple(kernel_size) == (1, 1) and strides_hw[0] == strides_hw[1] and no_padding
      and kw.get("feature_group_count", 1) == 1
      and set(kw) <= {"use_bias", "kernel_init", "bias_init", "dtype", "name",
                      "feature_group_count", "kernel_dilation"}):
    kw.pop("feature_group_count", None)
    kw.pop("kernel_dilation", None)
    return PointwiseConv(features, strides_hw[0], **kw)
  return nn.Conv(features, tuple(kernel_size), strides=strides, padding=padding, **kw)


class DepthwiseConv(nn.Module):
  """A depthwise k x k conv with the parameters of `nn.Conv(C, feature_group_count=C)`
  ("kernel" (k, k, 1, C), optional "bias"), computed by `depthwise_conv`."""

  kernel_size: int = 3
  strides: int = 1
  dilation: int = 1
  padding: int = 0
  use_bias: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    kernel = self.param("kernel", conv_kernel_init, (self.kernel_size, self.kernel_size, 1, c),
                        jnp.float32)
    y = depthwise_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.strides,
                       self.dilation, self.padding)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (c,), jnp.float32).astype(self.dtype)
    return y


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
    if self.groups > 1 and self.groups == x.shape[-1] == self.features:
      x = DepthwiseConv(k, self.strides, self.dilation, pad, self.use_bias, self.dtype,
                        name="conv")(x)
    elif self.groups == 1 and self.dilation > 1 and k > 1:
      x = DilatedConv(self.features, k, self.strides, self.dilation, pad, self.use_bias,
                      conv_kernel_init, self.dtype, name="conv")(x)
    else:
      x = conv(self.features, (k, k), strides=self.strides, padding=[(pad, pad)] * 2,
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
  Whole-number upsampling factors (the decoders' x4, the image-pooling branch's 1 -> h) take
  `upsample_bilinear`, which gives the same values without `jax.image.resize`'s dense
  interpolation matrices.
  """
  b, h, w, c = x_bhwc.shape
  if (h, w) == tuple(size):
    return x_bhwc
  if size[0] % h == 0 and size[1] % w == 0:
    return upsample_bilinear(x_bhwc, (size[0] // h, size[1] // w))
  if not all(isinstance(d, int) for d in (h, w, *size)):  # symbolic (jax.export)
    return jax.image.resize(x_bhwc, (b, *size, c), method="bilinear", antialias=False)
  # jax.image.resize's interpolation as two matrix products with float64-built weights: the
  # same values, and an ONNX converter traces it into plain ops (jax2onnx binds
  # jax.image.resize itself, for a fixed batch size only).
  x = jnp.einsum("Hh,bhwc->bHwc", _bilinear_matrix(h, size[0]).astype(x_bhwc.dtype), x_bhwc,
                 precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum("Ww,bhwc->bhWc", _bilinear_matrix(w, size[1]).astype(x.dtype), x,
                    precision=jax.lax.Precision.HIGHEST)


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) weights of half-pixel bilinear interpolation, positions clamped to the
  edge pixels (torch's align_corners=False; jax.image.resize without antialiasing)."""
  pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
  lo = np.floor(pos).astype(np.int64)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = pos - lo
  weights = np.zeros((n_out, n_in))
  np.add.at(weights, (np.arange(n_out), lo), 1 - frac)
  np.add.at(weights, (np.arange(n_out), hi), frac)
  return weights


def upsample_bilinear(x_bhwc: jax.Array, factors: Sequence[int]) -> jax.Array:
  """Exact bilinear upsampling by whole-number factors (half-pixel centres, edges clamped).

  With factor f, output pixel f*i + r sits at input position i + d_r, d_r = (2r + 1 - f) / 2f,
  so each of the f phases is a fixed blend of a pixel and one neighbour: f slice-and-add maps
  interleaved, where `jax.image.resize` multiplies by an (f*n, n) interpolation matrix per axis.
  """
  def along(x, axis, f):
    n = x.shape[axis]
    if f == 1:
      return x
    if n == 1:  # every output pixel is the one input pixel
      return jnp.repeat(x, f, axis=axis)
    first, last = (jax.lax.slice_in_dim(x, 0, 1, axis=axis),
                   jax.lax.slice_in_dim(x, n - 1, n, axis=axis))
    prev = jnp.concatenate([first, jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)
    nxt = jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis), last], axis=axis)
    phases = []
    for r in range(f):
      d = (2 * r + 1 - f) / (2 * f)
      phases.append((1 + d) * x - d * prev if d < 0 else (1 - d) * x + d * nxt)
    stacked = jnp.stack(phases, axis=axis + 1)
    return stacked.reshape(*x.shape[:axis], f * n, *x.shape[axis + 1:])

  return along(along(x_bhwc, 1, factors[0]), 2, factors[1])


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
  """Exact 2x bilinear upsampling: each output pixel is 0.75 x nearest + 0.25 x next
  neighbour (`upsample_bilinear` with factor 2)."""
  return upsample_bilinear(x_bhwc, (2, 2))
