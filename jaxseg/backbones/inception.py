"""Inception-v3 (Szegedy et al. 2016, "Rethinking the Inception Architecture"), laid out as
keras.applications.InceptionV3, so that its ImageNet weights convert one to one.

jaxseg uses it for FID/KID features (`eval.features=DIR` of a converted Inception-v3: the pooled
2048 features of mixed10, the network FID was defined with). It is registered as a backbone
for the converter; DeepLab and U-Net do not offer it, since its "valid" convolutions give
feature maps that are not a fixed fraction of the input.

Same topology and value count as Keras without the classifier (21,802,784, the BatchNorm
moving statistics included). Keras conventions kept for parity: every convolution is
conv (no bias) -> BatchNorm without a scale (epsilon 1e-3) -> ReLU; the 3x3 average pools
count only the pixels inside the image. Layers carry Keras's automatic names in creation order
(`conv2d`, `conv2d_1`, ..., `batch_normalization_93`), which the converter renumbers from any
Keras session.

Note: the Inception graph of the original FID code (TF's 2015-12-05 release, ported by
pytorch-fid) differs from Keras's in its last blocks (a max pool in mixed10's pool branch,
resize to 299 built in), so FIDs from these features are close to, not equal to, published
ones.

Features: stem (3x3 conv 64, stride 2), stage1 (conv 192, stride 4 before the pool), stage2
(mixed2, stride 8), stage3 (mixed7, stride 16), stage4 (mixed10, stride 32, 2048 channels).
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.errors import JaxsegError
from jaxseg.layers import batch_norm, conv_kernel_init
from jaxseg.layers import conv as conv_layer

Dtype = Any


class InceptionV3(nn.Module):
  """keras.applications.InceptionV3 trunk returning {"stem", "stage1".."stage4"}."""

  output_stride: int = 32
  bn_epsilon: float = 1e-3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    if self.output_stride != 32:
      raise JaxsegError(f"Inception-v3 has output_stride 32 only, got {self.output_stride}")
    bn = batch_norm(train, self.dtype, epsilon=self.bn_epsilon, use_scale=False)
    layer = itertools.count()

    def conv(y, filters, kernel, strides=1, padding="SAME"):
      i = next(layer)
      suffix = f"_{i}" if i else ""
      y = conv_layer(filters, kernel, strides=strides, padding=padding, use_bias=False,
                     kernel_init=conv_kernel_init, dtype=self.dtype, name=f"conv2d{suffix}")(y)
      return nn.relu(bn(name=f"batch_normalization{suffix}")(y))

    max_pool = functools.partial(nn.max_pool, window_shape=(3, 3), strides=(2, 2),
                                 padding="VALID")

    def avg_pool(y):  # Keras/TF "same" average pooling: the border averages fewer pixels
      return nn.avg_pool(y, (3, 3), strides=(1, 1), padding="SAME", count_include_pad=False)

    x = jnp.asarray(x, self.dtype)
    x = conv(x, 32, (3, 3), strides=2, padding="VALID")
    x = conv(x, 32, (3, 3), padding="VALID")
    x = conv(x, 64, (3, 3))
    features = {"stem": x}
    x = max_pool(x)
    x = conv(x, 80, (1, 1), padding="VALID")
    x = conv(x, 192, (3, 3), padding="VALID")
    features["stage1"] = x
    x = max_pool(x)

    # mixed0-2 (35x35 at 299): 1x1 | 5x5 | double 3x3 | pool.
    for pool_filters in (32, 64, 64):
      branch1x1 = conv(x, 64, (1, 1))
      branch5x5 = conv(conv(x, 48, (1, 1)), 64, (5, 5))
      branch3x3dbl = conv(conv(conv(x, 64, (1, 1)), 96, (3, 3)), 96, (3, 3))
      branch_pool = conv(avg_pool(x), pool_filters, (1, 1))
      x = jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], -1)
    features["stage2"] = x

    # mixed3: grid reduction to 17x17.
    branch3x3 = conv(x, 384, (3, 3), strides=2, padding="VALID")
    branch3x3dbl = conv(conv(conv(x, 64, (1, 1)), 96, (3, 3)), 96, (3, 3), strides=2,
                        padding="VALID")
    x = jnp.concatenate([branch3x3, branch3x3dbl, max_pool(x)], -1)

    # mixed4-7: factorised 7x7 convolutions.
    for width in (128, 160, 160, 192):
      branch1x1 = conv(x, 192, (1, 1))
      branch7x7 = conv(conv(conv(x, width, (1, 1)), width, (1, 7)), 192, (7, 1))
      branch7x7dbl = conv(x, width, (1, 1))
      for filters, kernel in ((width, (7, 1)), (width, (1, 7)), (width, (7, 1)), (192, (1, 7))):
        branch7x7dbl = conv(branch7x7dbl, filters, kernel)
      branch_pool = conv(avg_pool(x), 192, (1, 1))
      x = jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], -1)
    features["stage3"] = x

    # mixed8: grid reduction to 8x8.
    branch3x3 = conv(conv(x, 192, (1, 1)), 320, (3, 3), strides=2, padding="VALID")
    branch7x7x3 = conv(conv(conv(x, 192, (1, 1)), 192, (1, 7)), 192, (7, 1))
    branch7x7x3 = conv(branch7x7x3, 192, (3, 3), strides=2, padding="VALID")
    x = jnp.concatenate([branch3x3, branch7x7x3, max_pool(x)], -1)

    # mixed9-10: expanded filter banks (1x3 and 3x1 side by side).
    for _ in range(2):
      branch1x1 = conv(x, 320, (1, 1))
      branch3x3 = conv(x, 384, (1, 1))
      branch3x3 = jnp.concatenate([conv(branch3x3, 384, (1, 3)), conv(branch3x3, 384, (3, 1))],
                                  -1)
      branch3x3dbl = conv(conv(x, 448, (1, 1)), 384, (3, 3))
      branch3x3dbl = jnp.concatenate([conv(branch3x3dbl, 384, (1, 3)),
                                      conv(branch3x3dbl, 384, (3, 1))], -1)
      branch_pool = conv(avg_pool(x), 192, (1, 1))
      x = jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], -1)
    features["stage4"] = x
    return features
