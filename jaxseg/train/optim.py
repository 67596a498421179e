"""Optimizers and learning-rate schedules, built from optax parts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
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


def backbone_mask(params):
  """True on every leaf under the model's top-level `backbone` module."""
  return {k: jax.tree.map(lambda _, b=k == "backbone": b, v) for k, v in params.items()}


def scale_backbone(multiplier: float, freeze_steps: int) -> optax.GradientTransformation:
  """Backbone updates x `multiplier`, and x 0 for the first `freeze_steps` updates.

  Applied to the final updates, so a frozen backbone gets no weight decay either; the
  optimizer's moments still see its gradients, as they would with a tiny learning rate.
  """
  def factor(count):
    return jnp.where(count < freeze_steps, 0.0, multiplier)

  return optax.masked(optax.scale_by_schedule(factor), backbone_mask)


def make_optimizer(name: str, schedule: optax.Schedule, *, weight_decay: float = 0.0,
                   momentum: float = 0.9, nesterov: bool = False, b1: float = 0.9,
                   b2: float = 0.999, clip_norm: float | None = None,
                   backbone_multiplier: float = 1.0, freeze_backbone_steps: int = 0
                   ) -> optax.GradientTransformation:
  """SGD with momentum (L2 on kernels, added to the gradient) or AdamW, after clipping; the
  backbone's updates optionally scaled (lower learning rate) or held at zero for a while."""
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
  if backbone_multiplier < 0 or freeze_backbone_steps < 0:
    raise JaxsegError("optim.backbone_lr_multiplier and optim.freeze_backbone_steps must not be "
                      f"negative (got {backbone_multiplier}, {freeze_backbone_steps})")
  if backbone_multiplier != 1.0 or freeze_backbone_steps:
    parts.append(scale_backbone(backbone_multiplier, freeze_backbone_steps))
  return optax.chain(*parts)
