"""BatchNorm with flax's variables and results, whose reductions run as dots on CPU.

A train step of a segmentation net on CPU spends a large share of its time in BatchNorm's
per-channel sums over (batch, height, width): the statistics in the forward pass, and the sums
of dy and dy * x_hat in the backward pass. XLA:CPU lowers a big reduction to a loop (split into
reduce-windows for accuracy) that runs 2-5x slower than the same sum written as a
vector-matrix product `ones @ x`, which it hands to YNNPACK (jaxseg/runtime.py). So on CPU the
sums are dots, and the backward pass is written out (`jax.custom_vjp`) so that its sums are
dots too instead of autodiff's reductions; on GPU and TPU the sums stay XLA reductions, which
fuse well there. Parameters (`scale`, `bias`), statistics (`batch_stats/mean`, `var`), the
fast variance E[x^2] - E[x]^2 clipped at 0, float32 statistics and the running-average
update are those of `flax.linen.BatchNorm`, so checkpoints and converted weights do not
change; `tests/test_norm.py` checks values and gradients against it.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


DOT_SUMS = "JAXSEG_CPU_DOT_SUMS"


def sum_rows(x_mc: jax.Array) -> jax.Array:
  """Float32 sums over the rows of an (M, C) array: `ones(M) @ x` on CPU, a reduction
  elsewhere (see the module docstring).

  The dot's summation order follows how XLA:CPU splits it over threads, so the same global
  batch run as one process or as several (each with its own thread pool) agrees to rounding
  that BatchNorm's backward pass amplifies (gradient norms to ~1e-4 after a few steps) rather
  than to ~1e-7. JAXSEG_CPU_DOT_SUMS=0 (read when a step is traced) makes CPU use the plain
  reduction, as GPUs and TPUs do.
  """
  if jax.default_backend() == "cpu" and os.environ.get(DOT_SUMS, "1") != "0":
    ones = jnp.ones((x_mc.shape[0],), x_mc.dtype)
    return jnp.dot(ones, x_mc, preferred_element_type=jnp.float32)
  return jnp.sum(x_mc, axis=0, dtype=jnp.float32)


def _statistics(x_mc):
  m = x_mc.shape[0]
  x32 = x_mc.astype(jnp.float32)
  mean = sum_rows(x_mc) / m
  var = jnp.maximum(0.0, sum_rows(x32 * x32) / m - mean * mean)
  return mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _normalize_batch(x_mc, scale, bias, epsilon, dtype):
  """(y, mean, var) of a batch in training mode; y in `dtype`, statistics float32. The
  statistics are outputs for the running averages only: their cotangents are ignored (the
  module stops their gradient)."""
  return _normalize_batch_fwd(x_mc, scale, bias, epsilon, dtype)[0]


def _normalize_batch_fwd(x_mc, scale, bias, epsilon, dtype):
  mean, var = _statistics(x_mc)
  inv = jax.lax.rsqrt(var + epsilon)
  y = (x_mc.astype(jnp.float32) - mean) * (inv * scale) + bias
  return (y.astype(dtype), mean, var), (x_mc, mean, inv, scale)


def _normalize_batch_bwd(epsilon, dtype, residuals, cotangents):
  del epsilon, dtype
  x_mc, mean, inv, scale = residuals
  dy = cotangents[0].astype(jnp.float32)
  m = x_mc.shape[0]
  x_hat = (x_mc.astype(jnp.float32) - mean) * inv
  dbias = sum_rows(dy)
  dscale = sum_rows(dy * x_hat)
  # d/dx of (x - mean(x)) * rsqrt(var(x) + eps): the textbook BN backward.
  dx = (scale * inv) * (dy - dbias / m - x_hat * (dscale / m))
  return dx.astype(x_mc.dtype), dscale, dbias


_normalize_batch.defvjp(_normalize_batch_fwd, _normalize_batch_bwd)


class BatchNorm(nn.Module):
  """`flax.linen.BatchNorm` over the last axis (the options jaxseg uses), faster on CPU.

  Under `jax.jit` over a sharded batch the statistics are sums over the global batch, so
  this is synchronised BN across devices without any axis name.
  """

  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Callable = nn.initializers.zeros
  scale_init: Callable = nn.initializers.ones

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    dtype = self.dtype or x.dtype
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    scale = (self.param("scale", self.scale_init, (c,), jnp.float32) if self.use_scale
             else jnp.ones((c,), jnp.float32))
    bias = (self.param("bias", self.bias_init, (c,), jnp.float32) if self.use_bias
            else jnp.zeros((c,), jnp.float32))
    if self.use_running_average:
      y = (x.astype(jnp.float32) - ra_mean.value) * (
          jax.lax.rsqrt(ra_var.value + self.epsilon) * scale) + bias
      return y.astype(dtype)
    y, mean, var = _normalize_batch(x.reshape(-1, c), scale, bias, self.epsilon,
                                    jnp.dtype(dtype))
    if not self.is_initializing():
      mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y.reshape(x.shape)
