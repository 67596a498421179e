"""Segmentation losses: cross entropy, soft Dice, focal, and weighted sums of them.

Conventions shared by every function here:
  * logits are channels-last `(..., H, W, K)` and are cast to float32 first, because models may
    emit bfloat16 and a softmax in bf16 loses too much precision;
  * labels are integers `(..., H, W)`; pixels equal to `ignore_index` contribute nothing, neither
    to the loss nor to its gradient (which is exactly zero there), and a batch with no valid pixel
    gives loss 0 rather than NaN;
  * every function is pure and jittable; keyword arguments are meant to be static.

The training engine calls `make_loss({"ce": 1.0, "dice": 0.5})(logits_bhwk, labels_bhw)`, which
returns `(loss, {"ce": ..., "dice": ...})`.
"""
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from jaxseg.errors import JaxsegError

Array = jax.Array


def _prepare(logits, labels, ignore_index):
  """Returns fp32 logits and labels made safe at ignored pixels, and the validity mask."""
  logits = jnp.asarray(logits).astype(jnp.float32)
  labels = jnp.asarray(labels)
  if logits.shape[:-1] != labels.shape:
    raise ValueError(f"logits {logits.shape} must be labels {labels.shape} + (K,)")
  mask = labels != ignore_index
  # Label 255 would make optax return NaN and one_hot return silently all-zero rows, so ignored
  # labels become 0. Logits there are zeroed through `where`, whose gradient is exactly zero on the
  # unselected side: ignored pixels get a zero gradient even if their logits are inf or NaN.
  labels = jnp.where(mask, labels, 0).astype(jnp.int32)
  logits = jnp.where(mask[..., None], logits, 0.0)
  return logits, labels, mask


def _safe_divide(num, den):
  """num / den, and 0 where den == 0 (no valid pixel), without NaN in the gradient."""
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def _class_vector(values, num_classes, name):
  """Returns a per-class float32 vector of length K from a scalar or a sequence."""
  v = jnp.asarray(values, jnp.float32)
  if v.ndim == 0:
    return jnp.full((num_classes,), v)
  if v.shape != (num_classes,):
    raise ValueError(f"{name} has shape {v.shape}, expected ({num_classes},)")
  return v


def softmax_cross_entropy(logits, labels, *, ignore_index: int = 255,
                          class_weights: Sequence[float] | Array | None = None,
                          label_smoothing: float = 0.0) -> Array:
  """Mean cross entropy over valid pixels; matches torch `F.cross_entropy(weight, label_smoothing)`.

  With `class_weights` w the result is the weighted mean sum(w[y] * ce) / sum(w[y]); with label
  smoothing eps the target is (1 - eps) * one_hot(y) + eps / K, and, as in torch, the smoothing
  term of a pixel is weighted per class (eps/K * sum_k w_k * -log p_k) but normalised by sum(w[y]).
  """
  logits, labels, mask = _prepare(logits, labels, ignore_index)
  k = logits.shape[-1]
  w = jnp.ones((k,), jnp.float32) if class_weights is None else _class_vector(
      class_weights, k, "class_weights")
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  w_y = w[labels] * mask
  per_pixel = w_y * nll
  if label_smoothing:
    smooth = -jnp.mean(logp * w, axis=-1) * mask
    per_pixel = (1.0 - label_smoothing) * per_pixel + label_smoothing * smooth
  return _safe_divide(jnp.sum(per_pixel), jnp.sum(w_y))


def dice_loss(logits, labels, *, ignore_index: int = 255, smooth: float = 1.0,
              class_weights: Sequence[float] | Array | None = None,
              classes: str = "present") -> Array:
  """Soft Dice loss 1 - mean_k dice_k on softmax probabilities (Milletari et al. 2016).

  dice_k = (2 * sum(p_k * t_k) + smooth) / (sum(p_k) + sum(t_k) + smooth), summed over the whole
  batch and all valid pixels, as segmentation_models_pytorch's `DiceLoss(mode="multiclass")`.
  `classes="present"` averages only over classes that occur in the batch's valid labels: with
  `smooth` > 0 an absent class the model correctly never predicts scores dice ~1 and would dilute
  the loss. smp also masks such classes but still divides by K; here the mean is over the present
  classes only. `classes="all"` averages over all K classes. `class_weights` make it a weighted
  mean over classes. A batch with no valid pixel gives 0.
  """
  if classes not in ("present", "all"):
    raise ValueError(f"classes must be 'present' or 'all', got {classes!r}")
  logits, labels, mask = _prepare(logits, labels, ignore_index)
  k = logits.shape[-1]
  m = mask[..., None].astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1) * m
  target = jax.nn.one_hot(labels, k, dtype=jnp.float32) * m
  axes = tuple(range(logits.ndim - 1))
  intersection = jnp.sum(probs * target, axis=axes)
  cardinality = jnp.sum(probs + target, axis=axes)
  dice = (2.0 * intersection + smooth) / jnp.maximum(cardinality + smooth, 1e-7)
  w = jnp.ones((k,), jnp.float32) if class_weights is None else _class_vector(
      class_weights, k, "class_weights")
  if classes == "present":
    w = w * (jnp.sum(target, axis=axes) > 0)
  else:
    w = w * jnp.any(mask)  # no valid pixel at all: loss 0, as for the other losses
  return _safe_divide(jnp.sum(w * (1.0 - dice)), jnp.sum(w))


def focal_loss(logits, labels, *, gamma: float = 2.0,
               alpha: float | Sequence[float] | Array | None = None,
               ignore_index: int = 255) -> Array:
  """Multi-class focal loss -alpha_y (1 - p_y)^gamma log p_y (Lin et al. 2017), mean over valid pixels.

  `alpha` is None, a scalar, or a per-class vector indexed by the label. gamma=0 and alpha=None
  give cross entropy.
  """
  logits, labels, mask = _prepare(logits, labels, ignore_index)
  logp = jax.nn.log_softmax(logits, axis=-1)
  logp_y = jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  # 1 - p via expm1 stays accurate for confident pixels; x**gamma has an infinite derivative at
  # x = 0 when gamma < 1, so the base is kept away from 0 under `where` to keep gradients finite.
  one_minus_p = jnp.maximum(-jnp.expm1(logp_y), 0.0)
  positive = one_minus_p > 0
  modulator = jnp.where(positive, jnp.where(positive, one_minus_p, 1.0) ** gamma, 0.0 ** gamma)
  per_pixel = -modulator * logp_y
  if alpha is not None:
    per_pixel = per_pixel * _class_vector(alpha, logits.shape[-1], "alpha")[labels]
  return _safe_divide(jnp.sum(per_pixel * mask), jnp.sum(mask).astype(jnp.float32))


LOSSES: dict[str, Callable[..., Array]] = {
    "ce": softmax_cross_entropy,
    "dice": dice_loss,
    "focal": focal_loss,
}


def make_loss(spec: Mapping[str, float], *, ignore_index: int = 255,
              class_weights: Sequence[float] | Array | None = None,
              ) -> Callable[[Array, Array], tuple[Array, dict[str, Array]]]:
  """Returns `fn(logits_bhwk, labels_bhw) -> (sum_i spec[i] * loss_i, {name_i: loss_i})`.

  `class_weights` go to every component: CE and Dice weights, focal `alpha`. The components in the
  dict are unweighted, for logging.
  """
  unknown = sorted(set(spec) - set(LOSSES))
  spec = {name: weight for name, weight in spec.items() if weight}  # weight 0: not computed
  if unknown or not spec:
    raise JaxsegError(f"unknown or empty loss spec {sorted(unknown or spec)} (train.loss); "
                      f"valid names: {sorted(LOSSES)}")
  kwargs = {
      "ce": dict(class_weights=class_weights),
      "dice": dict(class_weights=class_weights),
      "focal": dict(alpha=class_weights),
  }
  def loss_fn(logits_bhwk, labels_bhw):
    parts = {name: LOSSES[name](logits_bhwk, labels_bhw, ignore_index=ignore_index, **kwargs[name])
             for name in spec}
    total = sum(spec[name] * value for name, value in parts.items())
    return total, parts

  return loss_fn
