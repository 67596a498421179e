"""Optimizers and learning-rate schedules, built from optax parts."""

from __future__ import annotations

import jax
import optax

from jaxseg.errors import JaxsegError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("poly", "cosine", "constant")


def make_schedule(name: str, learning_rate: float, total_steps: int, *, warmup_steps: int = 0,
                  power: float = 0.9, end_factor: float = 0.0) -> optax.Schedule:
  """Linear warm-up from 0, then DeepLab's poly decay (1 - t/T)^power, cosine, or constant."""
  decay_steps = max(total_steps - warmup_steps, 1)
  end = learning_rate * end_factor
  if name == "poly":
    decay = optax.polynomial_schedule(learning_rate, end, power, decay_steps)
  elif name == "cosine":
    decay = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=end_factor)
  elif name == "constant":
    decay = optax.constant_schedule(learning_rate)
  else:
    raise JaxsegError(f"unknown schedule {name!r}; valid choices: {', '.join(SCHEDULES)}")
  if warmup_steps <= 0:
    return decay
  # Starts at lr / (warmup + 1) rather than 0, so that the first step already trains.
  warmup = optax.linear_schedule(learning_rate / (warmup_steps + 1), learning_rate, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def decay_mask(params):
  """Weight decay on conv/dense kernels only: not on BatchNorm scales/offsets or biases."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(name: str, schedule: optax.Schedule, *, weight_decay: float = 0.0,
                   momentum: float = 0.9, nesterov: bool = False, b1: float = 0.9,
                   b2: float = 0.999, clip_norm: float | None = None
                   ) -> optax.GradientTransformation:
  """SGD with momentum (L2 on kernels, added to the gradient) or AdamW, after clipping."""
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  if name == "sgd":
    if weight_decay:
      parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
    parts.append(optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov))
  elif name == "adamw":
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay,
                             mask=decay_mask))
  else:
    raise JaxsegError(f"unknown optimizer {name!r}; valid choices: {', '.join(OPTIMIZERS)}")
  return optax.chain(*parts)
