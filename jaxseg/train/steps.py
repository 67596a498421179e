"""Pure train/eval steps. They know nothing about devices: the caller jits them with shardings."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxseg import metrics
from jaxseg.inference import sliding_logits
from jaxseg.train import ema as ema_lib


def _select(ok, new, old):
  """`new` where `ok`, else `old`, leaf by leaf (keeps a bad step from touching the state)."""
  return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def apply_update(state, loss, grads, batch_stats, rng, schedule: optax.Schedule,
                 components=None, ema_decay: float = 0.0):
  """(new state, step metrics) after one update, or the old state (step counter and
  non-finite counters advanced) when the loss, a gradient, a BatchNorm statistic or the
  updated parameters are not finite (the last catches a learning rate or an optimizer
  statistic gone bad). `rng` is the state's next key (kept only with the update).

  A state with a weight average (`state.ema`) has it moved towards the new weights with
  `ema_decay` (jaxseg.train.ema); a skipped step leaves it as it was."""
  grad_norm = optax.tree.norm(grads)  # inf/NaN if any gradient entry is
  new = state.apply_gradients(grads=grads)
  ok = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) &
        jnp.isfinite(optax.tree.norm(batch_stats)) & jnp.isfinite(optax.tree.norm(new.params)))
  if ema_lib.has_average(state):
    # t = updates applied before this one: the optimizer's count, not the data position.
    average = ema_lib.update(state.ema, new.params, batch_stats, ema_decay,
                             state.step - state.nonfinite_total)
    state = state.replace(ema=_select(ok, average, state.ema))
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


def micro_batches(batch, num: int):
  """(B, ...) leaves -> (num, B / num, ...): micro-batch i holds rows i, num + i, 2 num + i...

  Strided rather than consecutive rows, so that with the batch sharded over the mesh (each
  device holding consecutive rows) every micro-batch is spread over every device, with no
  data moved: needs B divisible by num x devices (checked by the task)."""
  return jax.tree.map(
      lambda x: jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1), batch)


def weighted_mean_over(fn: Callable, micro, weight: Callable | None = None,
                       sequential: bool | None = None):
  """sum_i w_i fn(micro_i) / sum_i w_i, leaf by leaf, over the leading axis of `micro`.

  `sequential` (default: on every backend but the CPU) runs the micro-batches as a loop
  (lax.scan), so that only one micro-batch's activations are alive at a time: that is what
  gradient accumulation saves (DeepLabV3+ R50 at 512x512, batch 8: XLA's peak 6.6 GB whole,
  3.8 GB in 2 micro-batches, 2.3 GB in 4; benchmarks/accumulate_memory.py). XLA:CPU runs that
  loop about 13x slower than the same work unrolled (a 16-feature U-Net step, batch 8 at 64x64
  in 2 micro-batches: 1.64 s against 0.14 s; 0.12 s whole), so on the CPU the loop is
  unrolled: the same numbers at the same speed, but XLA then schedules the micro-batches side
  by side and saves no memory.
  `weight(m)` (default 1) lets a loss normalised per micro-batch (a weighted mean) add up to
  the loss of the whole batch exactly."""
  first = jax.tree.map(lambda x: x[0], micro)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, first))

  def body(carry, m):
    total, weights = carry
    w = jnp.float32(1.0) if weight is None else weight(m).astype(jnp.float32)
    total = jax.tree.map(lambda t, x: t + (w * x).astype(t.dtype), total, fn(m))
    return (total, weights + w), None

  if sequential is None:
    sequential = jax.default_backend() != "cpu"
  (total, weights), _ = jax.lax.scan(body, (zeros, jnp.float32(0.0)), micro,
                                     unroll=not sequential)
  return jax.tree.map(lambda t: (t / jnp.maximum(weights, 1e-12)).astype(t.dtype), total)


def make_train_step(loss_fn: Callable, preprocess: Callable, schedule: optax.Schedule,
                    freeze_backbone_steps: int = 0, *, accumulate_steps: int = 1,
                    ema_decay: float = 0.0, sequential: bool | None = None):
  """Returns `train_step(state, batch) -> (state, metrics)`.

  For the first `freeze_backbone_steps` updates the backbone's BatchNorm running statistics stay
  as they are, like its parameters (which the optimizer holds still, see optim.scale_backbone).

  `loss_fn(logits_bhwk, labels_bhw) -> (loss, components)` computes in float32. A step whose
  loss, gradients or new BatchNorm statistics are not finite changes nothing but the step
  counter and the non-finite counters: `optax.apply_if_finite` alone would still let NaN into
  the BatchNorm running averages, which live outside the optimizer.

  With `accumulate_steps` > 1 the batch is split into that many micro-batches (see
  `micro_batches`) whose losses, gradients and new BatchNorm statistics are averaged before
  the one update: the mean of the micro-batch losses is the batch's loss when each
  micro-batch has as many counted pixels (no BatchNorm, no ignored pixels, no Dice term, whose
  ratio is not a mean over pixels). BatchNorm normalises each micro-batch with its own
  statistics, and the running statistics move once, towards their mean over micro-batches.
  `sequential`: see `weighted_mean_over`.
  """

  def train_step(state, batch):
    rng, dropout_rng = jax.random.split(jax.random.wrap_key_data(state.rng))

    def loss_and_grads(images, labels, dropout_rng):
      images = preprocess(images)  # per micro-batch: the float copy is a micro-batch's too

      def compute_loss(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, images, train=True,
            mutable=["batch_stats"], rngs={"dropout": dropout_rng})
        loss, components = loss_fn(logits, labels)
        return loss, (components, updates["batch_stats"])

      (loss, (components, new_stats)), grads = jax.value_and_grad(
          compute_loss, has_aux=True)(state.params)
      return loss, components, new_stats, grads

    if accumulate_steps == 1:
      loss, components, batch_stats, grads = loss_and_grads(batch["image"], batch["label"],
                                                            dropout_rng)
    else:
      micro = micro_batches({"image": batch["image"], "label": batch["label"]},
                            accumulate_steps)
      micro["rng"] = jax.random.split(dropout_rng, accumulate_steps)
      loss, components, batch_stats, grads = weighted_mean_over(
          lambda m: loss_and_grads(m["image"], m["label"], m["rng"]), micro,
          sequential=sequential)
    if freeze_backbone_steps:
      # Finite updates so far: the optimizer's own step count, which its freeze follows.
      thawed = state.step - state.nonfinite_total >= freeze_backbone_steps
      batch_stats = {**batch_stats, "backbone": _select(
          thawed, batch_stats["backbone"], state.batch_stats["backbone"])}
    return apply_update(state, loss, grads, batch_stats, rng, schedule, components, ema_decay)

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
