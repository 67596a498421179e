"""Train state: params, optimizer state, BatchNorm statistics, RNG and non-finite counters."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax.training import train_state


class TrainState(train_state.TrainState):
  """flax's TrainState plus what a segmentation step needs to be resumable and robust.

  `rng` is raw key data (uint32) so it checkpoints like any array; `step` counts steps taken
  (the data position), while the optimizer's own count only advances on finite updates.
  """

  batch_stats: Any = None
  rng: jax.Array = None
  nonfinite_streak: jax.Array = None  # consecutive skipped steps
  nonfinite_total: jax.Array = None  # skipped steps since the start of training

  @classmethod
  def create(cls, *, apply_fn, params, tx, batch_stats, rng, **kwargs):
    return super().create(
        apply_fn=apply_fn, params=params, tx=tx, batch_stats=batch_stats,
        rng=jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng,
        nonfinite_streak=jnp.zeros((), jnp.int32), nonfinite_total=jnp.zeros((), jnp.int32),
        **kwargs)
