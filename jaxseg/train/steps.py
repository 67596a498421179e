"""Pure train/eval steps. They know nothing about devices: the caller jits them with shardings."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxseg import metrics
from jaxseg.inference import sliding_logits


def _select(ok, new, old):
  """`new` where `ok`, else `old`, leaf by leaf (keeps a bad step from touching the state)."""
  return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def apply_update(state, loss, grads, batch_stats, rng, schedule: optax.Schedule,
                 components=None):
  """(new state, step metrics) after one update, or the old state (step counter and
  non-finite counters advanced) when the loss, a gradient, a BatchNorm statistic or the
  updated parameters are not finite (the last catches a learning rate or an optimizer
  statistic gone bad). `rng` is the state's next key (kept only with the update)."""
  grad_norm = optax.tree.norm(grads)  # inf/NaN if any gradient entry is
  new = state.apply_gradients(grads=grads)
  ok = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) &
        jnp.isfinite(optax.tree.norm(batch_stats)) & jnp.isfinite(optax.tree.norm(new.params)))
  state = state.replace(
      step=state.step + 1,
      params=_select(ok, new.params, state.params),
      opt_state=_select(ok, new.opt_state, state.opt_state),
      batch_stats=_select(ok, batch_stats, state.batch_stats),
      rng=jnp.where(ok, jax.random.key_data(rng), state.rng),
      nonfinite_streak=jnp.where(ok, 0, state.nonfinite_streak + 1),
      nonfinite_total=state.nonfinite_total + (~ok).astype(jnp.int32))
  # The optimizer's step count advances only on finite updates; so does its schedule.
  lr = schedule(state.step - 1 - (state.nonfinite_total - (~ok).astype(jnp.int32)))
  out = {"loss": loss, "grad_norm": grad_norm, "learning_rate": lr, "finite": ok,
         "nonfinite_streak": state.nonfinite_streak}
  out.update({f"loss_{k}": v for k, v in (components or {}).items()})
  return state, out


def make_train_step(loss_fn: Callable, preprocess: Callable, schedule: optax.Schedule,
                    freeze_backbone_steps: int = 0):
  """Returns `train_step(state, batch) -> (state, metrics)`.

  For the first `freeze_backbone_steps` updates the backbone's BatchNorm running statistics stay
  as they are, like its parameters (which the optimizer holds still, see optim.scale_backbone).

  `loss_fn(logits_bhwk, labels_bhw) -> (loss, components)` computes in float32. A step whose
  loss, gradients or new BatchNorm statistics are not finite changes nothing but the step
  counter and the non-finite counters: `optax.apply_if_finite` alone would still let NaN into
  the BatchNorm running averages, which live outside the optimizer.
  """

  def train_step(state, batch):
    rng, dropout_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    images = preprocess(batch["image"])

    def compute_loss(params):
      logits, updates = state.apply_fn(
          {"params": params, "batch_stats": state.batch_stats}, images, train=True,
          mutable=["batch_stats"], rngs={"dropout": dropout_rng})
      loss, components = loss_fn(logits, batch["label"])
      return loss, (components, updates["batch_stats"])

    (loss, (components, batch_stats)), grads = jax.value_and_grad(
        compute_loss, has_aux=True)(state.params)
    if freeze_backbone_steps:
      # Finite updates so far: the optimizer's own step count, which its freeze follows.
      thawed = state.step - state.nonfinite_total >= freeze_backbone_steps
      batch_stats = {**batch_stats, "backbone": _select(
          thawed, batch_stats["backbone"], state.batch_stats["backbone"])}
    return apply_update(state, loss, grads, batch_stats, rng, schedule, components)

  return train_step


def make_eval_step(preprocess: Callable, num_classes: int, ignore_index: int = 255,
                   window: tuple[int, int] | None = None):
  """Returns `eval_step(state, batch) -> (confusion matrix, predictions)`.

  `batch["mask"]` (per example) excludes the padding of a last, incomplete batch. With
  `window` (h, w), images larger than it are evaluated by sliding window.
  """

  def eval_step(state, batch):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    apply = lambda x: state.apply_fn(variables, x, train=False)
    images = preprocess(batch["image"])
    if window is not None and (images.shape[1] > window[0] or images.shape[2] > window[1]):
      logits = sliding_logits(apply, images, window, num_classes)
    else:
      logits = apply(images)
    predictions = jnp.argmax(logits.astype(jnp.float32), axis=-1)
    mask = jnp.broadcast_to(batch["mask"][:, None, None], batch["label"].shape)
    confusion = metrics.confusion_matrix(batch["label"], predictions, num_classes,
                                         ignore_index, mask=mask)
    return confusion, predictions.astype(jnp.uint8)

  return eval_step
