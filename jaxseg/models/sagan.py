"""SAGAN: Self-Attention GAN (Zhang, Goodfellow, Metaxas & Odena, 2019, arXiv:1805.08318).

Follows the released code (brain-research/self-attention-gan), which differs from the paper's
text in places (BigGAN-PyTorch's authors make the same remark):

* Spectral normalisation (one power iteration, persistent `u` in the `batch_stats` collection,
  flax `nn.SpectralNorm`) on every convolution, dense layer and the projection embedding. The
  class-conditional BatchNorm tables are plain parameters, as in the reference.
* Self-attention: 1x1 convolutions without bias, query/key with C/8 channels, value C/2; keys
  and values max-pooled 2x2 (N x N/4 attention); a 1x1 convolution back to C, and
  `x + gamma * o` with gamma initialised at 0.
* Generator: a dense layer to 4x4x(16 ch), up-sampling residual blocks (CBN, ReLU, nearest 2x,
  3x3 conv, CBN, ReLU, 3x3 conv; 1x1 conv shortcut), attention after the block that reaches
  `attention_resolution`, then BN, ReLU, 3x3 conv to RGB, tanh.
* Discriminator: pre-activation residual blocks with 2x2 average pooling, attention after the
  block that reaches `attention_resolution`, ReLU, a global sum, a dense output, plus the
  projection term <embed(y), h> when class-conditional (Miyato & Koyama 2018).

At 128x128 with 1000 classes, z = 128 and ch = 64, the parameter counts are those of the
reference: generator 42,078,852, discriminator 39,463,618 (tested).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Channel multipliers of ch per block (the generator's from 4x4 up, the discriminator's from
# the image down), by resolution. 128: the reference's ImageNet model.
G_CHANNELS = {128: (16, 8, 4, 2, 1), 64: (16, 8, 4, 2), 32: (4, 4, 4)}
D_CHANNELS = {128: (1, 2, 4, 8, 16, 16), 64: (1, 2, 4, 8, 16), 32: (2, 2, 2, 2)}
# The reference's discriminator stops down-sampling at 4x4; its last block keeps the size.

_init = nn.initializers.xavier_uniform()


class SNConv(nn.Module):
  """A spectrally normalised convolution ('SAME' padding)."""
  features: int
  kernel: int = 3
  strides: int = 1
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    conv = nn.Conv(self.features, (self.kernel, self.kernel), strides=self.strides,
                   padding="SAME", use_bias=self.use_bias, kernel_init=_init, dtype=self.dtype)
    return nn.SpectralNorm(conv, name="sn")(x, update_stats=train)


class SNDense(nn.Module):
  """A spectrally normalised dense layer."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    dense = nn.Dense(self.features, kernel_init=_init, dtype=self.dtype)
    return nn.SpectralNorm(dense, name="sn")(x, update_stats=train)


class SNEmbed(nn.Module):
  """A spectrally normalised embedding (the projection discriminator's class vectors)."""
  num_embeddings: int
  features: int

  @nn.compact
  def __call__(self, labels, *, train: bool):
    embed = nn.Embed(self.num_embeddings, self.features, embedding_init=_init)
    return nn.SpectralNorm(embed, name="sn")(labels, update_stats=train)


class SelfAttention2D(nn.Module):
  """SAGAN's self-attention block; the attention weights are sown as
  `intermediates/attention` (B, H*W, H*W/4)."""
  pool: bool = True  # max-pool keys and values 2x2 (the reference does)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    b, h, w, c = x.shape
    if c < 8:
      raise ValueError(f"self-attention needs at least 8 channels (queries have C/8); got {c}")
    conv = lambda f, name: SNConv(f, 1, use_bias=False, dtype=self.dtype, name=name)
    query = conv(c // 8, "query")(x, train=train).reshape(b, h * w, c // 8)
    key = conv(c // 8, "key")(x, train=train)
    value = conv(c // 2, "value")(x, train=train)
    if self.pool:
      key, value = (nn.max_pool(t, (2, 2), (2, 2)) for t in (key, value))
    key = key.reshape(b, -1, c // 8)
    value = value.reshape(b, -1, c // 2)
    # Softmax in float32 whatever the compute dtype: bf16 logits over H*W/4 positions lose
    # too much precision.
    logits = jnp.einsum("bqc,bkc->bqk", query, key).astype(jnp.float32)
    attention = jax.nn.softmax(logits, axis=-1)
    self.sow("intermediates", "attention", attention)
    out = jnp.einsum("bqk,bkc->bqc", attention.astype(value.dtype), value)
    out = conv(c, "out")(out.reshape(b, h, w, c // 2), train=train)
    gamma = self.param("gamma", nn.initializers.zeros, ())
    return x + gamma * out


class ConditionalBatchNorm(nn.Module):
  """BatchNorm whose scale and offset are looked up per class (num_classes = 0: learned
  vectors, plain BatchNorm)."""
  num_classes: int = 0
  momentum: float = 0.999  # the reference's moving-average decay
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, labels, *, train: bool):
    c = x.shape[-1]
    x = nn.BatchNorm(use_running_average=not train, use_scale=False, use_bias=False,
                     momentum=self.momentum, epsilon=self.epsilon, dtype=self.dtype,
                     name="bn")(x)
    if self.num_classes:
      gamma = nn.Embed(self.num_classes, c, embedding_init=nn.initializers.ones,
                       name="gamma")(labels)[:, None, None]
      beta = nn.Embed(self.num_classes, c, embedding_init=nn.initializers.zeros,
                      name="beta")(labels)[:, None, None]
    else:
      gamma = self.param("gamma", nn.initializers.ones, (c,))
      beta = self.param("beta", nn.initializers.zeros, (c,))
    return x * gamma.astype(x.dtype) + beta.astype(x.dtype)


def _up(x):
  """Nearest-neighbour 2x up-sampling."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _down(x):
  """2x2 average pooling."""
  return nn.avg_pool(x, (2, 2), (2, 2))


class GBlock(nn.Module):
  """CBN-ReLU-up-conv3-CBN-ReLU-conv3, plus up-conv1 shortcut."""
  features: int
  num_classes: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, labels, *, train: bool):
    cbn = lambda name: ConditionalBatchNorm(self.num_classes, dtype=self.dtype, name=name)
    h = nn.relu(cbn("cbn1")(x, labels, train=train))
    h = SNConv(self.features, 3, dtype=self.dtype, name="conv1")(_up(h), train=train)
    h = nn.relu(cbn("cbn2")(h, labels, train=train))
    h = SNConv(self.features, 3, dtype=self.dtype, name="conv2")(h, train=train)
    return h + SNConv(self.features, 1, dtype=self.dtype, name="shortcut")(_up(x), train=train)


class DBlock(nn.Module):
  """Pre-activation residual block (ReLU-conv3-ReLU-conv3, average pooling); the first block
  takes the image and skips the first ReLU and pools before its shortcut convolution."""
  features: int
  downsample: bool = True
  first: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    h = x if self.first else nn.relu(x)
    h = SNConv(self.features, 3, dtype=self.dtype, name="conv1")(h, train=train)
    h = SNConv(self.features, 3, dtype=self.dtype, name="conv2")(nn.relu(h), train=train)
    if self.downsample:
      h = _down(h)
    shortcut = x
    if self.first:  # SN-GAN's "optimized block": pool, then the 1x1 convolution
      shortcut = SNConv(self.features, 1, dtype=self.dtype, name="shortcut")(_down(x),
                                                                            train=train)
    elif self.downsample or x.shape[-1] != self.features:
      shortcut = SNConv(self.features, 1, dtype=self.dtype, name="shortcut")(x, train=train)
      shortcut = _down(shortcut) if self.downsample else shortcut
    return h + shortcut


class Generator(nn.Module):
  """z (B, z_dim) [+ class labels (B,)] -> images (B, R, R, 3) in [-1, 1]."""
  resolution: int = 128
  num_classes: int = 0  # 0: unconditional
  ch: int = 64
  channels: Sequence[int] | None = None  # multipliers of ch per block; default by resolution
  attention_resolution: int | None = 32  # None: no attention
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z, labels=None, *, train: bool):
    mults = self.channels or G_CHANNELS[self.resolution]
    if 4 * 2 ** len(mults) != self.resolution:
      raise ValueError(f"{len(mults)} up-sampling blocks from 4x4 do not reach "
                       f"{self.resolution}x{self.resolution}")
    labels = _labels(labels, z.shape[0], self.num_classes)
    h = SNDense(4 * 4 * self.ch * mults[0], dtype=self.dtype, name="dense")(z, train=train)
    h = h.reshape(z.shape[0], 4, 4, self.ch * mults[0])
    size = 4
    for i, mult in enumerate(mults):
      h = GBlock(self.ch * mult, self.num_classes, self.dtype, name=f"block{i + 1}")(
          h, labels, train=train)
      size *= 2
      if size == self.attention_resolution:
        h = SelfAttention2D(dtype=self.dtype, name="attention")(h, train=train)
    h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.999, epsilon=1e-5,
                             dtype=self.dtype, name="bn")(h))
    h = SNConv(3, 3, dtype=self.dtype, name="to_rgb")(h, train=train)
    return jnp.tanh(h.astype(jnp.float32))


class Discriminator(nn.Module):
  """images (B, R, R, 3) [+ labels (B,)] -> float32 logits (B,): real > 0 > fake."""
  resolution: int = 128
  num_classes: int = 0  # 0: unconditional; otherwise a projection discriminator
  ch: int = 64
  channels: Sequence[int] | None = None  # multipliers of ch per block; default by resolution
  attention_resolution: int | None = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, labels=None, *, train: bool):
    mults = self.channels or D_CHANNELS[self.resolution]
    labels = _labels(labels, images.shape[0], self.num_classes)
    h, size = images.astype(self.dtype), images.shape[1]
    for i, mult in enumerate(mults):
      # Down-sample until 4x4; later blocks keep the size (the reference's last block).
      down = size > 4
      h = DBlock(self.ch * mult, downsample=down, first=i == 0, dtype=self.dtype,
                 name=f"block{i + 1}")(h, train=train)
      size //= 2 if down else 1
      if size == self.attention_resolution:
        h = SelfAttention2D(dtype=self.dtype, name="attention")(h, train=train)
    h = jnp.sum(nn.relu(h), axis=(1, 2)).astype(jnp.float32)
    out = SNDense(1, name="dense")(h, train=train)[:, 0]
    if self.num_classes:
      out = out + jnp.sum(SNEmbed(self.num_classes, h.shape[-1], name="embed")(
          labels, train=train) * h, axis=-1)
    return out


def _labels(labels, batch: int, num_classes: int):
  if num_classes and labels is None:
    raise ValueError(f"a class-conditional model ({num_classes} classes) needs labels")
  return labels if num_classes else jnp.zeros((batch,), jnp.int32)
