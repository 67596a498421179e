"""Tests for jaxseg.losses against independent numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxseg import losses

K = 5
IGNORE = 255


def _data(seed=0, shape=(2, 8, 8), k=K, ignore_frac=0.0):
  """Random logits (..., K) and labels with a fraction of pixels set to IGNORE."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(scale=3.0, size=shape + (k,)).astype(np.float32)
  labels = rng.integers(0, k, size=shape).astype(np.int32)
  if ignore_frac:
    labels[rng.random(shape) < ignore_frac] = IGNORE
  return logits, labels


def _np_log_softmax(x):
  x = x.astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_ce(logits, labels, weights=None):
  """Reference: torch-style (weighted) mean of -log p_y over non-ignored pixels."""
  valid = labels != IGNORE
  logp = _np_log_softmax(logits[valid])
  y = labels[valid]
  nll = -logp[np.arange(len(y)), y]
  w = np.ones(logits.shape[-1]) if weights is None else np.asarray(weights, np.float64)
  return (w[y] * nll).sum() / w[y].sum()


def _np_dice_loss(logits, labels, smooth=1.0, present_only=True):
  """Reference: 1 - mean over classes of batch-wide soft dice, from probabilities."""
  valid = labels != IGNORE
  p = np.exp(_np_log_softmax(logits[valid]))
  t = np.eye(logits.shape[-1])[labels[valid]]
  dice = (2 * (p * t).sum(0) + smooth) / (p.sum(0) + t.sum(0) + smooth)
  keep = t.sum(0) > 0 if present_only else np.ones(logits.shape[-1], bool)
  return 1.0 - dice[keep].mean()


ALL_LOSSES = {
    "ce": losses.softmax_cross_entropy,
    "ce_weighted_smooth": lambda x, y, **kw: losses.softmax_cross_entropy(
        x, y, class_weights=[1.0, 2.0, 0.5, 1.0, 3.0], label_smoothing=0.1, **kw),
    "dice": losses.dice_loss,
    "dice_all": lambda x, y, **kw: losses.dice_loss(x, y, classes="all", **kw),
    "focal": losses.focal_loss,
    "focal_gamma_half": lambda x, y, **kw: losses.focal_loss(x, y, gamma=0.5, **kw),
    "combined": lambda x, y, **kw: losses.make_loss(
        {"ce": 1.0, "dice": 0.5, "focal": 0.25}, **kw)(x, y)[0],
}


def test_cross_entropy_matches_numpy():
  logits, labels = _data(ignore_frac=0.2)
  got = losses.softmax_cross_entropy(logits, labels)
  np.testing.assert_allclose(got, _np_ce(logits, labels), rtol=1e-5)


def test_cross_entropy_class_weights_torch_formula():
  logits, labels = _data(seed=1, ignore_frac=0.2)
  w = [0.2, 1.0, 3.0, 0.5, 2.0]
  got = losses.softmax_cross_entropy(logits, labels, class_weights=w)
  want = _np_ce(logits, labels, w)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # The weights must matter on this data, or the check above proves nothing.
  assert abs(want - _np_ce(logits, labels)) > 1e-2


def test_cross_entropy_label_smoothing_matches_optax():
  logits, labels = _data(seed=2)
  eps = 0.1
  targets = (1 - eps) * jax.nn.one_hot(labels, K) + eps / K
  want = optax.softmax_cross_entropy(logits, targets).mean()
  got = losses.softmax_cross_entropy(logits, labels, label_smoothing=eps)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert abs(got - losses.softmax_cross_entropy(logits, labels)) > 1e-3


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_ignored_pixels_contribute_nothing(name):
  fn = ALL_LOSSES[name]
  logits, labels = _data(seed=3, shape=(2, 6, 6), ignore_frac=0.3)
  ignored = labels == IGNORE
  # Garbage (including inf) at ignored pixels must neither change the loss nor leak NaN.
  noisy = logits.copy()
  noisy[ignored] = 1e4
  noisy[ignored, 0] = np.inf
  valid_only = fn(logits[~ignored][None, None], labels[~ignored][None, None],
                  ignore_index=IGNORE)
  loss, grad = jax.jit(jax.value_and_grad(lambda x: fn(x, labels, ignore_index=IGNORE)))(noisy)
  np.testing.assert_allclose(loss, valid_only, rtol=1e-5)
  assert np.all(np.isfinite(grad))
  assert np.all(grad[ignored] == 0.0)
  assert np.any(grad[~ignored] != 0.0)


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_all_ignored_gives_zero_loss_and_gradient(name):
  fn = ALL_LOSSES[name]
  logits, _ = _data(seed=4, shape=(2, 4, 4))
  labels = np.full((2, 4, 4), IGNORE, np.int32)
  loss, grad = jax.jit(jax.value_and_grad(lambda x: fn(x, labels, ignore_index=IGNORE)))(logits)
  assert loss == 0.0 and loss.dtype == jnp.float32
  assert np.all(grad == 0.0)


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_bf16_logits_give_fp32_loss(name):
  fn = ALL_LOSSES[name]
  logits, labels = _data(seed=5, ignore_frac=0.1)
  want = fn(logits, labels)
  got = fn(jnp.asarray(logits, jnp.bfloat16), labels)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=2e-2, atol=1e-3)


def test_dice_perfect_prediction_is_zero():
  _, labels = _data(seed=6, ignore_frac=0.2)
  logits = 50.0 * np.eye(K, dtype=np.float32)[np.where(labels == IGNORE, 0, labels)]
  assert losses.dice_loss(logits, labels) < 1e-5
  assert losses.dice_loss(logits, labels, classes="all") < 1e-5
  assert losses.dice_loss(-logits, labels) > 0.9


@pytest.mark.parametrize("classes", ["present", "all"])
def test_dice_matches_numpy(classes):
  logits, labels = _data(seed=7, ignore_frac=0.2)
  labels[labels == 4] = 0  # class 4 absent: "present" and "all" must then differ
  got = losses.dice_loss(logits, labels, classes=classes)
  want = _np_dice_loss(logits, labels, present_only=classes == "present")
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert abs(_np_dice_loss(logits, labels, present_only=True)
             - _np_dice_loss(logits, labels, present_only=False)) > 1e-3


def test_dice_class_weights_are_weighted_mean():
  logits, labels = _data(seed=8)
  w = np.array([1.0, 0.0, 0.0, 0.0, 0.0], np.float32)
  only0 = losses.dice_loss(logits, labels, class_weights=w)
  valid = labels != IGNORE
  p = np.exp(_np_log_softmax(logits))[..., 0]
  t = (labels == 0).astype(np.float64)
  want = 1 - (2 * (p * t)[valid].sum() + 1) / (p[valid].sum() + t[valid].sum() + 1)
  np.testing.assert_allclose(only0, want, rtol=1e-5)


def test_focal_gamma_zero_equals_cross_entropy_and_is_smaller_otherwise():
  logits, labels = _data(seed=9, ignore_frac=0.2)
  ce = losses.softmax_cross_entropy(logits, labels)
  np.testing.assert_allclose(losses.focal_loss(logits, labels, gamma=0.0), ce, rtol=1e-6)
  for gamma in (0.5, 2.0):
    assert losses.focal_loss(logits, labels, gamma=gamma) < ce


def test_focal_matches_numpy_with_alpha():
  logits, labels = _data(seed=10, ignore_frac=0.2)
  alpha = np.array([0.25, 0.5, 1.0, 2.0, 0.75])
  valid = labels != IGNORE
  y = labels[valid]
  p_y = np.exp(_np_log_softmax(logits[valid]))[np.arange(len(y)), y]
  want = np.mean(-alpha[y] * (1 - p_y) ** 2 * np.log(p_y))
  got = losses.focal_loss(logits, labels, gamma=2.0, alpha=alpha)
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_make_loss_combines_components():
  logits, labels = _data(seed=11, ignore_frac=0.1)
  loss, aux = losses.make_loss({"ce": 1, "dice": 0.5})(logits, labels)
  ce = losses.softmax_cross_entropy(logits, labels)
  dice = losses.dice_loss(logits, labels)
  assert set(aux) == {"ce", "dice"}
  np.testing.assert_allclose(aux["ce"], ce, rtol=1e-6)
  np.testing.assert_allclose(aux["dice"], dice, rtol=1e-6)
  np.testing.assert_allclose(loss, ce + 0.5 * dice, rtol=1e-6)


def test_make_loss_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match="valid names") as info:
    losses.make_loss({"ce": 1.0, "lovasz": 1.0})
  for name in losses.LOSSES:
    assert repr(name) in str(info.value)


def test_shape_mismatch_raises():
  logits, labels = _data()
  with pytest.raises(ValueError, match="must be labels"):
    losses.softmax_cross_entropy(logits, labels[:, :4])


def test_jit_matches_eager():
  logits, labels = _data(seed=12, ignore_frac=0.2)
  fn = losses.make_loss({"ce": 1.0, "dice": 1.0, "focal": 1.0}, class_weights=[1, 2, 1, 1, 1])
  eager, eager_aux = fn(logits, labels)
  jitted, jitted_aux = jax.jit(fn)(logits, labels)
  np.testing.assert_allclose(jitted, eager, rtol=1e-5)
  for name in eager_aux:
    np.testing.assert_allclose(jitted_aux[name], eager_aux[name], rtol=1e-5)
