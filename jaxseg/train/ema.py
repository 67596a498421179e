"""An exponential moving average of the weights, for every task (`train.ema_decay`).

The average covers the parameters *and* the BatchNorm statistics (timm's ModelEmaV2 and
mmsegmentation's EMAHook average buffers too): averaged weights evaluated with the raw run's
statistics would normalise with statistics of other weights.

It lives in the train state as `{"params": ..., "batch_stats": ...}` (None when off, which
adds no leaves: a run without it checkpoints exactly as before) and is updated after each
finite update with TensorFlow's `ExponentialMovingAverage(num_updates=...)` warm-up:

    decay_t = min(ema_decay, (1 + t) / (10 + t)),   t = updates applied before this one

A fixed 0.999 from the first step would keep 0.999^t of the random initial weights (55% after
600 steps): the average of a short run would be mostly noise.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax


def warmup_decay(ema_decay: float, updates):
  """The decay of update number `updates` (0-based), TF's warm-up capped at `ema_decay`."""
  updates = jnp.asarray(updates, jnp.float32)
  return jnp.minimum(ema_decay, (1.0 + updates) / (10.0 + updates))


def init(params, batch_stats) -> dict[str, Any]:
  """The average at the start: the initial (or pretrained) weights."""
  return {"params": params, "batch_stats": batch_stats}


def update(average, params, batch_stats, ema_decay: float, updates):
  """The average after an update whose new weights are `params` and `batch_stats`."""
  decay = warmup_decay(ema_decay, updates)
  return optax.incremental_update(init(params, batch_stats), average, 1.0 - decay)


def averaged(state):
  """`state` whose params and batch_stats are its averages (for evaluating them with the
  same jitted step: the trees have the same structure, shapes and shardings)."""
  return state.replace(params=state.ema["params"], batch_stats=state.ema["batch_stats"])


def has_average(state) -> bool:
  return getattr(state, "ema", None) is not None
