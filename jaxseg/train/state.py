"""Train state: params, optimizer state, BatchNorm statistics, RNG, non-finite counters and
the optional weight average."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax.training import train_state

from jaxseg.train import ema as ema_lib


class TrainState(train_state.TrainState):
  """flax's TrainState plus what a segmentation step needs to be resumable and robust.

  `rng` is raw key data (uint32) so it checkpoints like any array; `step` counts steps taken
  (the data position), while the optimizer's own count only advances on finite updates.
  """

  batch_stats: Any = None
  rng: jax.Array = None
  nonfinite_streak: jax.Array = None  # consecutive skipped steps
  nonfinite_total: jax.Array = None  # skipped steps since the start of training
  # jaxseg.train.ema's average of params and batch_stats (train.ema_decay > 0), else None
  ema: Any = None

  @classmethod
  def create(cls, *, apply_fn, params, tx, batch_stats, rng, with_ema: bool = False, **kwargs):
    return super().create(
        apply_fn=apply_fn, params=params, tx=tx, batch_stats=batch_stats,
        rng=jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng,
        nonfinite_streak=jnp.zeros((), jnp.int32), nonfinite_total=jnp.zeros((), jnp.int32),
        ema=ema_lib.init(params, batch_stats) if with_ema else None, **kwargs)
