"""Segmentation losses: cross entropy, soft Dice, focal, Lovasz-softmax, Tversky, OHEM cross
entropy, and weighted sums of them.

Conventions shared by every function here:
  * logits are channels-last `(..., H, W, K)` and are cast to float32 first, because models may
    emit bfloat16 and a softmax in bf16 loses too much precision;
  * labels are integers `(..., H, W)`; pixels equal to `ignore_index` contribute nothing, neither
    to the loss nor to its gradient (which is exactly zero there), and a batch with no valid pixel
    gives loss 0 rather than NaN;
  * every function is pure and jittable; keyword arguments are meant to be static.

The training engine calls `make_loss({"ce": 1.0, "dice": 0.5})(logits_bhwk, labels_bhw)`, which
returns `(loss, {"ce": ..., "dice": ...})`; `make_loss(..., options={"ohem": {"thresh": 0.8}})`
passes per-loss keyword arguments (the config's `train.loss_options`).
"""
from collections.abc import Callable, Mapping, Sequence
import inspect
import math

import jax
from jax import lax
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


def _soft_targets(logits, labels, ignore_index):
  """(softmax probabilities, one-hot targets, both zero at ignored pixels; the validity mask;
  the axes to sum a class's pixels over) of the overlap losses (Dice, Tversky)."""
  logits, labels, mask = _prepare(logits, labels, ignore_index)
  m = mask[..., None].astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1) * m
  target = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32) * m
  return probs, target, mask, tuple(range(logits.ndim - 1))


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
  probs, target, mask, axes = _soft_targets(logits, labels, ignore_index)
  k = probs.shape[-1]
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


def _nonnegative_power(base, gamma):
  """base ** gamma for base >= 0, 0 at base == 0, with a finite gradient even for gamma < 1."""
  if gamma == 1.0:
    return base
  positive = base > 0
  return jnp.where(positive, jnp.where(positive, base, 1.0) ** gamma, 0.0)


def _lovasz_softmax_flat(probs, labels, mask, classes):
  """Lovasz-softmax of one set of pixels: probs (P, K), labels and mask (P,); 0 if none is valid."""
  k = probs.shape[-1]
  fg = jax.nn.one_hot(labels, k, dtype=jnp.float32) * mask[:, None]
  # Ignored pixels get error 0 and fg 0: they sort after every pixel with a positive error, so the
  # cumulative sums at those pixels see only valid ones, and wherever they or other zero-error
  # pixels land they add 0 * grad. The value is thus that of the valid pixels alone, whatever the
  # order among ties (the Lovasz extension does not depend on it), and `where` makes the gradient
  # at ignored pixels exactly zero.
  errors = jnp.where(mask[:, None], jnp.abs(fg - probs), 0.0)
  neg_sorted, fg_sorted = lax.sort((-errors.T, fg.T), dimension=1, num_keys=1)  # (K, P), descending
  gts = jnp.sum(fg_sorted, axis=1, keepdims=True)
  intersection = gts - jnp.cumsum(fg_sorted, axis=1)
  union = gts + jnp.cumsum(1.0 - fg_sorted, axis=1)  # >= 1 everywhere: no division by zero
  jaccard = 1.0 - intersection / union
  grad = jnp.concatenate([jaccard[:, :1], jnp.diff(jaccard, axis=1)], axis=1)
  per_class = jnp.sum(-neg_sorted * grad, axis=1)
  if classes == "present":
    w = (gts[:, 0] > 0).astype(jnp.float32)
  else:
    w = jnp.full((k,), jnp.any(mask), jnp.float32)
  return _safe_divide(jnp.sum(w * per_class), jnp.sum(w))


def lovasz_softmax(logits, labels, *, ignore_index: int = 255, per_image: bool = False,
                   classes: str = "present") -> Array:
  """Lovasz-softmax loss (Berman et al. 2018), a convex surrogate of 1 - mean IoU.

  For each class c, with errors e_i = |[y_i == c] - p_ic| over the valid pixels, the loss is the
  Lovasz extension of the Jaccard loss: sort e descending and take the dot product with the
  increments of 1 - IoU along the sorted order; the result is the mean over classes. Matches
  segmentation_models_pytorch's `LovaszLoss(mode="multiclass", per_image, ignore_index)`.

  Args:
    logits: `(..., H, W, K)` logits; softmax over the last axis gives the probabilities.
    labels: `(..., H, W)` integer labels.
    ignore_index: label of pixels that contribute nothing.
    per_image: if False, one loss over all pixels of the batch; if True, the loss of each image
      (the leading axes before H, W) and then their mean over the images that have a valid pixel
      (smp fails on an image with no valid pixel; here such an image is left out of the mean).
    classes: "present" averages over the classes present in the valid labels (of the batch, or of
      the image with `per_image`), as smp; "all" over all K classes.

  Returns:
    A float32 scalar; 0 for a batch with no valid pixel.
  """
  if classes not in ("present", "all"):
    raise ValueError(f"classes must be 'present' or 'all', got {classes!r}")
  logits, labels, mask = _prepare(logits, labels, ignore_index)
  k = logits.shape[-1]
  probs = jax.nn.softmax(logits, axis=-1)
  if not per_image:
    return _lovasz_softmax_flat(probs.reshape(-1, k), labels.reshape(-1), mask.reshape(-1), classes)
  n_images = math.prod(labels.shape[:-2])
  per_image_loss = jax.vmap(lambda p, y, m: _lovasz_softmax_flat(p, y, m, classes))(
      probs.reshape(n_images, -1, k), labels.reshape(n_images, -1), mask.reshape(n_images, -1))
  has_valid = jnp.any(mask.reshape(n_images, -1), axis=1).astype(jnp.float32)
  return _safe_divide(jnp.sum(per_image_loss * has_valid), jnp.sum(has_valid))


def tversky_loss(logits, labels, *, alpha: float = 0.5, beta: float = 0.5, gamma: float = 1.0,
                 smooth: float = 0.0, ignore_index: int = 255, classes: str = "present") -> Array:
  """Tversky loss (Salehi et al. 2017) on softmax probabilities, raised to the power gamma.

  tversky_k = (TP_k + smooth) / max(TP_k + alpha * FP_k + beta * FN_k + smooth, 1e-7), with soft
  counts TP_k = sum(p_k * t_k), FP_k = sum(p_k * (1 - t_k)), FN_k = sum((1 - p_k) * t_k) over the
  whole batch and all valid pixels; the loss is (mean_k (1 - tversky_k)) ** gamma. alpha weighs
  false positives, beta false negatives; alpha = beta = 0.5 with smooth = 0 is dice_loss with
  smooth = 0.

  `classes` chooses the mean over classes: "present" (the default, as dice_loss, whose docstring
  explains why) averages over the classes that occur in the batch's valid labels; "all" over all
  K classes; "smp" reproduces segmentation_models_pytorch's
  `TverskyLoss(mode="multiclass", alpha, beta, gamma, smooth, ignore_index, from_logits=True)`
  exactly: absent classes count 0 but the sum is still divided by K. A batch with no valid pixel
  gives 0 in every mode.
  """
  if classes not in ("present", "all", "smp"):
    raise ValueError(f"classes must be 'present', 'all' or 'smp', got {classes!r}")
  probs, target, mask, axes = _soft_targets(logits, labels, ignore_index)
  k = probs.shape[-1]
  tp = jnp.sum(probs * target, axis=axes)
  fp = jnp.sum(probs * (1.0 - target), axis=axes)
  fn = jnp.sum((1.0 - probs) * target, axis=axes)
  tversky = (tp + smooth) / jnp.maximum(tp + alpha * fp + beta * fn + smooth, 1e-7)
  per_class = 1.0 - tversky
  present = (jnp.sum(target, axis=axes) > 0).astype(jnp.float32)
  if classes == "present":
    mean = _safe_divide(jnp.sum(present * per_class), jnp.sum(present))
  elif classes == "smp":
    mean = jnp.sum(present * per_class) / k
  else:
    mean = jnp.mean(per_class) * jnp.any(mask)  # no valid pixel at all: 0
  return _nonnegative_power(mean, gamma)


def ohem_cross_entropy(logits, labels, *, thresh: float = 0.7, min_kept: int = 100000,
                       ignore_index: int = 255,
                       class_weights: Sequence[float] | Array | None = None) -> Array:
  """Cross entropy over the hard pixels chosen by mmsegmentation's `OHEMPixelSampler` rule.

  Over all valid pixels of the batch at once, with p the softmax probability of the true class
  and p_(0) <= p_(1) <= ... its sorted values over the n valid pixels, the threshold is
  max(thresh, p_(min(min_kept * N, n - 1))), N being the number of images (the product of the
  leading axes before H, W: mmseg's `batch_kept`); pixels with p strictly below it are kept. So
  at least min(min_kept * N, n - 1) pixels are kept (fewer only on ties) and more when many are
  below `thresh`; with min_kept * N >= n every valid pixel but the most confident is kept unless
  `thresh` exceeds its p. The selection uses no gradient.

  The loss is the mean cross entropy over the kept pixels, weighted as softmax_cross_entropy:
  sum(w[y] * ce) / sum(w[y]). (mmseg's decode head instead divides the kept pixels' summed loss
  by the number of all pixels, or of valid ones with `avg_non_ignore`.) A batch with no kept
  pixel gives 0.
  """
  if min_kept < 0:
    raise ValueError(f"min_kept must be >= 0, got {min_kept}")
  logits, labels, mask = _prepare(logits, labels, ignore_index)
  k = logits.shape[-1]
  w = jnp.ones((k,), jnp.float32) if class_weights is None else _class_vector(
      class_weights, k, "class_weights")
  logp = jax.nn.log_softmax(logits, axis=-1)
  logp_y = jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  prob = lax.stop_gradient(jnp.exp(logp_y))
  # One static-shape sort over all pixels; ignored ones sort last (+inf) and are never indexed.
  flat_mask = mask.reshape(-1)
  sorted_prob = jnp.sort(jnp.where(flat_mask, prob.reshape(-1), jnp.inf))
  n_valid = jnp.sum(flat_mask, dtype=jnp.int32)
  batch_kept = min(min_kept * math.prod(labels.shape[:-2]), max(sorted_prob.size - 1, 0))
  index = jnp.maximum(jnp.minimum(batch_kept, n_valid - 1), 0)
  min_threshold = jnp.where(n_valid > 0, sorted_prob[index], 0.0)
  threshold = jnp.maximum(min_threshold, jnp.float32(thresh))
  w_y = w[labels] * (mask & (prob < threshold))
  return _safe_divide(jnp.sum(w_y * -logp_y), jnp.sum(w_y))


LOSSES: dict[str, Callable[..., Array]] = {
    "ce": softmax_cross_entropy,
    "dice": dice_loss,
    "focal": focal_loss,
    "lovasz": lovasz_softmax,
    "tversky": tversky_loss,
    "ohem": ohem_cross_entropy,
}


def _option_names(fn) -> set[str] | None:
  """The keyword arguments that `make_loss` options may set for a loss fn (None: any)."""
  params = inspect.signature(fn).parameters.values()
  if any(p.kind is p.VAR_KEYWORD for p in params):
    return None
  return {p.name for p in params if p.kind is p.KEYWORD_ONLY} - {"ignore_index"}


def make_loss(spec: Mapping[str, float], *, ignore_index: int = 255,
              class_weights: Sequence[float] | Array | None = None,
              options: Mapping[str, Mapping] | None = None,
              ) -> Callable[[Array, Array], tuple[Array, dict[str, Array]]]:
  """Returns `fn(logits_bhwk, labels_bhw) -> (sum_i spec[i] * loss_i, {name_i: loss_i})`.

  `class_weights` go to the components that take them: CE, Dice and OHEM weights, focal `alpha`;
  Lovasz and Tversky take none. `options` maps a loss name to keyword arguments of its function
  (config `train.loss_options`), e.g. `{"ohem": {"thresh": 0.7, "min_kept": 100000},
  "tversky": {"alpha": 0.3, "beta": 0.7}}`; they override the `class_weights` plumbing, may name a
  loss that `spec` leaves out, and may not set `ignore_index`. The components in the dict are
  unweighted, for logging.
  """
  unknown = sorted(set(spec) - set(LOSSES))
  spec = {name: weight for name, weight in spec.items() if weight}  # weight 0: not computed
  if unknown or not spec:
    raise JaxsegError(f"unknown or empty loss spec {sorted(unknown or spec)} (train.loss); "
                      f"valid names: {sorted(LOSSES)}")
  options = {name: dict(opts) for name, opts in (options or {}).items()}
  for name, opts in options.items():
    if name not in LOSSES:
      raise JaxsegError(f"unknown loss train.loss_options.{name}; valid names: {sorted(LOSSES)}")
    valid = _option_names(LOSSES[name])
    for key in opts:
      if valid is not None and key not in valid:
        raise JaxsegError(f"unknown option train.loss_options.{name}.{key}; valid options for "
                          f"{name!r}: {sorted(valid)}")
  plumbed = {
      "ce": dict(class_weights=class_weights),
      "dice": dict(class_weights=class_weights),
      "focal": dict(alpha=class_weights),
      "ohem": dict(class_weights=class_weights),
  }
  kwargs = {name: {**plumbed.get(name, {}), **options.get(name, {})} for name in spec}
  def loss_fn(logits_bhwk, labels_bhw):
    parts = {name: LOSSES[name](logits_bhwk, labels_bhw, ignore_index=ignore_index, **kwargs[name])
             for name in spec}
    total = sum(spec[name] * value for name, value in parts.items())
    return total, parts

  return loss_fn
