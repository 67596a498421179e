"""A mask-to-image GAN: label maps (+ noise) -> images, to make labelled training pairs.

The generator is SPADE's (Park et al. 2019): residual blocks whose normalisation is modulated
per pixel by the label map (a parameter-free BatchNorm, then gamma and beta predicted from the
one-hot labels by small convolutions), up-sampling from a noise vector, so that every pixel's
class steers what is drawn there. The discriminator is a PatchGAN (Isola et al. 2017) that
sees the image together with its one-hot label map and scores overlapping patches. Both use
SAGAN's spectral normalisation on every convolution and its self-attention block at
`attention_resolution` (jaxseg.models.sagan). The discriminator also returns its intermediate
features for pix2pixHD's feature-matching loss.

Ignored pixels (`ignore_index`) get a channel of their own in the one-hot map.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxseg.models.sagan import SelfAttention2D, SNConv, SNDense, _up


def one_hot_labels(labels, num_classes: int, ignore_index: int = 255, dtype=jnp.float32):
  """(B, H, W) class ids -> (B, H, W, num_classes + 1); the last channel marks ignored pixels."""
  labels = labels.astype(jnp.int32)
  labels = jnp.where(labels == ignore_index, num_classes, labels)
  return jax.nn.one_hot(labels, num_classes + 1, dtype=dtype)


def _nearest(segmap, size):
  """Nearest-neighbour down-sampling of a (B, H, W, C) map by an integer factor."""
  fy, fx = segmap.shape[1] // size[0], segmap.shape[2] // size[1]
  return segmap[:, fy // 2::fy, fx // 2::fx][:, :size[0], :size[1]]


class SPADE(nn.Module):
  """Parameter-free BatchNorm, then x * (1 + gamma(labels)) + beta(labels), per pixel."""
  hidden: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, segmap, *, train: bool):
    c = x.shape[-1]
    x = nn.BatchNorm(use_running_average=not train, use_scale=False, use_bias=False,
                     momentum=0.99, epsilon=1e-5, dtype=self.dtype, name="bn")(x)
    seg = _nearest(segmap.astype(self.dtype), x.shape[1:3])
    h = nn.relu(SNConv(self.hidden, 3, dtype=self.dtype, name="shared")(seg, train=train))
    gamma = SNConv(c, 3, dtype=self.dtype, name="gamma")(h, train=train)
    beta = SNConv(c, 3, dtype=self.dtype, name="beta")(h, train=train)
    return x * (1 + gamma) + beta


class SPADEBlock(nn.Module):
  """SPADE-ReLU-conv3-SPADE-ReLU-conv3 with a SPADE-conv1 shortcut when channels change."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, segmap, *, train: bool):
    hidden = min(x.shape[-1], self.features)
    h = nn.relu(SPADE(dtype=self.dtype, name="norm1")(x, segmap, train=train))
    h = SNConv(hidden, 3, dtype=self.dtype, name="conv1")(h, train=train)
    h = nn.relu(SPADE(dtype=self.dtype, name="norm2")(h, segmap, train=train))
    h = SNConv(self.features, 3, dtype=self.dtype, name="conv2")(h, train=train)
    if x.shape[-1] != self.features:
      x = SPADE(dtype=self.dtype, name="norm_shortcut")(x, segmap, train=train)
      x = SNConv(self.features, 1, use_bias=False, dtype=self.dtype, name="shortcut")(
          x, train=train)
    return h + x


class MaskToImageGenerator(nn.Module):
  """(labels (B, H, W), z (B, z_dim)) -> images (B, H, W, 3) in [-1, 1].

  H and W must be multiples of 2^(len(channels) - 1): the noise is mapped to a grid that many
  times smaller and up-sampled block by block.
  """
  num_classes: int
  ch: int = 64
  channels: Sequence[int] = (8, 8, 4, 2, 1)  # multipliers of ch per block, coarse to fine
  z_dim: int = 64
  attention_resolution: int | None = 32  # image height at which attention runs; None: none
  ignore_index: int = 255
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, labels, z, *, train: bool):
    b, h, w = labels.shape
    factor = 2 ** (len(self.channels) - 1)
    if h % factor or w % factor:
      raise ValueError(f"label maps must be multiples of {factor} on a side; got {h}x{w}")
    segmap = one_hot_labels(labels, self.num_classes, self.ignore_index, self.dtype)
    size = (h // factor, w // factor)
    x = SNDense(size[0] * size[1] * self.ch * self.channels[0], dtype=self.dtype,
                name="dense")(z, train=train)
    x = x.reshape(b, *size, self.ch * self.channels[0])
    for i, mult in enumerate(self.channels):
      if i:
        x = _up(x)
      x = SPADEBlock(self.ch * mult, dtype=self.dtype, name=f"block{i + 1}")(x, segmap,
                                                                            train=train)
      if x.shape[1] == self.attention_resolution:
        x = SelfAttention2D(dtype=self.dtype, name="attention")(x, train=train)
    x = SNConv(3, 3, dtype=self.dtype, name="to_rgb")(nn.leaky_relu(x, 0.2), train=train)
    return jnp.tanh(x.astype(jnp.float32))


class PatchDiscriminator(nn.Module):
  """(images (B, H, W, 3), labels (B, H, W)) -> (float32 patch logits (B, h, w), features).

  4x4 convolutions, stride 2 for `num_downsamples` layers then stride 1 (pix2pix's 70x70
  PatchGAN for 3), LeakyReLU(0.2), no normalisation besides SN.
  """
  num_classes: int
  ch: int = 64
  num_downsamples: int = 3
  attention_resolution: int | None = 32  # feature-map height at which attention runs
  ignore_index: int = 255
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, labels, *, train: bool):
    segmap = one_hot_labels(labels, self.num_classes, self.ignore_index, self.dtype)
    x = jnp.concatenate([images.astype(self.dtype), segmap], -1)
    features = []
    for i in range(self.num_downsamples + 1):
      stride = 2 if i < self.num_downsamples else 1
      x = SNConv(self.ch * 2 ** min(i, 3), 4, strides=stride, dtype=self.dtype,
                 name=f"conv{i + 1}")(x, train=train)
      x = nn.leaky_relu(x, 0.2)
      if x.shape[1] == self.attention_resolution and i < self.num_downsamples:
        x = SelfAttention2D(dtype=self.dtype, name="attention")(x, train=train)
      features.append(x.astype(jnp.float32))
    logits = SNConv(1, 4, dtype=self.dtype, name="logits")(x, train=train)[..., 0]
    return logits.astype(jnp.float32), features
