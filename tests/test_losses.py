"""Tests for jaxseg.losses against independent numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxseg import losses
from jaxseg.errors import JaxsegError

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
    "lovasz": losses.lovasz_softmax,
    "lovasz_all": lambda x, y, **kw: losses.lovasz_softmax(x, y, classes="all", **kw),
    "tversky": lambda x, y, **kw: losses.tversky_loss(x, y, alpha=0.3, beta=0.7, **kw),
    "tversky_smp_gamma_half": lambda x, y, **kw: losses.tversky_loss(
        x, y, alpha=0.7, beta=0.3, gamma=0.5, classes="smp", **kw),
    "ohem": losses.ohem_cross_entropy,
    "combined": lambda x, y, **kw: losses.make_loss(
        {"ce": 1.0, "dice": 0.5, "focal": 0.25}, **kw)(x, y)[0],
}

# Losses whose value depends on how pixels split into images (per-image Lovasz; OHEM keeps
# min_kept pixels per image), so they are not checked against the valid pixels as one image.
BATCH_LOSSES = {
    "lovasz_per_image": lambda x, y, **kw: losses.lovasz_softmax(x, y, per_image=True, **kw),
    "ohem_min_kept": lambda x, y, **kw: losses.ohem_cross_entropy(
        x, y, thresh=0.5, min_kept=8, class_weights=[1.0, 2.0, 0.5, 1.0, 3.0], **kw),
}
EVERY_LOSS = {**ALL_LOSSES, **BATCH_LOSSES}


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


def _with_garbage_at_ignored(fn):
  """(labels, ignored, logits, the loss and gradient of logits with 1e4 and inf at the ignored
  pixels): garbage there must neither change the loss nor leak NaN."""
  logits, labels = _data(seed=3, shape=(2, 6, 6), ignore_frac=0.3)
  ignored = labels == IGNORE
  noisy = logits.copy()
  noisy[ignored] = 1e4
  noisy[ignored, 0] = np.inf
  loss, grad = jax.jit(jax.value_and_grad(lambda x: fn(x, labels, ignore_index=IGNORE)))(noisy)
  assert np.all(np.isfinite(grad))
  assert np.all(grad[ignored] == 0.0)
  assert np.any(grad[~ignored] != 0.0)
  return labels, ignored, logits, loss


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_ignored_pixels_contribute_nothing(name):
  """The loss equals the loss of the valid pixels alone (taken as one image)."""
  fn = ALL_LOSSES[name]
  labels, ignored, logits, loss = _with_garbage_at_ignored(fn)
  valid_only = fn(logits[~ignored][None, None], labels[~ignored][None, None],
                  ignore_index=IGNORE)
  np.testing.assert_allclose(loss, valid_only, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(BATCH_LOSSES))
def test_ignored_pixels_contribute_nothing_per_image(name):
  """Losses whose value depends on how pixels split into images: clean logits, same loss."""
  fn = BATCH_LOSSES[name]
  labels, _, logits, loss = _with_garbage_at_ignored(fn)
  np.testing.assert_allclose(loss, fn(logits, labels, ignore_index=IGNORE), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(EVERY_LOSS))
def test_all_ignored_gives_zero_loss_and_gradient(name):
  fn = EVERY_LOSS[name]
  logits, _ = _data(seed=4, shape=(2, 4, 4))
  labels = np.full((2, 4, 4), IGNORE, np.int32)
  loss, grad = jax.jit(jax.value_and_grad(lambda x: fn(x, labels, ignore_index=IGNORE)))(logits)
  assert loss == 0.0 and loss.dtype == jnp.float32
  assert np.all(grad == 0.0)


@pytest.mark.parametrize("name", sorted(EVERY_LOSS))
def test_bf16_logits_give_fp32_loss(name):
  fn = EVERY_LOSS[name]
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
    losses.make_loss({"ce": 1.0, "hinge": 1.0})
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


# --- Lovasz-softmax, Tversky and OHEM -----------------------------------------------------------


@pytest.fixture(scope="module")
def smp():
  """segmentation_models_pytorch; imported here so that the other tests do not need torch."""
  pytest.importorskip("torch")
  from tests import torch_reference  # pylint: disable=g-import-not-at-top
  return torch_reference.import_smp()


def _smp_loss(module, logits, labels):
  torch = pytest.importorskip("torch")
  with torch.no_grad():
    return module(torch.from_numpy(logits).permute(0, 3, 1, 2),
                  torch.from_numpy(labels.astype(np.int64))).item()


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("absent", [False, True])
def test_lovasz_matches_smp(smp, per_image, absent):
  logits, labels = _data(seed=13, k=4, ignore_frac=0.2)
  if absent:
    labels[labels == 3] = 0
  want = _smp_loss(smp.losses.LovaszLoss("multiclass", per_image=per_image, ignore_index=IGNORE),
                   logits, labels)
  got = losses.lovasz_softmax(logits, labels, per_image=per_image)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Per image and per batch differ on this data, so each parametrisation checks its own path.
  assert abs(losses.lovasz_softmax(logits, labels, per_image=not per_image) - got) > 1e-4


def test_lovasz_perfect_prediction_is_zero():
  _, labels = _data(seed=14, ignore_frac=0.2)
  logits = 50.0 * np.eye(K, dtype=np.float32)[np.where(labels == IGNORE, 0, labels)]
  assert losses.lovasz_softmax(logits, labels) < 1e-5
  assert losses.lovasz_softmax(-logits, labels) > 0.5


@pytest.mark.parametrize("alpha,beta,gamma", [(0.3, 0.7, 1.0), (0.7, 0.3, 2.0)])
def test_tversky_smp_mode_matches_smp(smp, alpha, beta, gamma):
  logits, labels = _data(seed=15, k=4, ignore_frac=0.2)
  labels[labels == 3] = 0  # an absent class: smp still divides by K
  module = smp.losses.TverskyLoss("multiclass", alpha=alpha, beta=beta, gamma=gamma, smooth=0.0,
                                  ignore_index=IGNORE, from_logits=True)
  want = _smp_loss(module, logits, labels)
  got = losses.tversky_loss(logits, labels, alpha=alpha, beta=beta, gamma=gamma, classes="smp")
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # "present" averages over the 3 present classes instead of K = 4.
  present = losses.tversky_loss(logits, labels, alpha=alpha, beta=beta, gamma=gamma)
  np.testing.assert_allclose(present, (want ** (1 / gamma) * 4 / 3) ** gamma, rtol=1e-5)


def test_tversky_half_half_is_dice_without_smoothing():
  logits, labels = _data(seed=16, ignore_frac=0.2)
  labels[labels == 4] = 0
  for classes in ("present", "all"):
    np.testing.assert_allclose(losses.tversky_loss(logits, labels, classes=classes),
                               losses.dice_loss(logits, labels, smooth=0.0, classes=classes),
                               rtol=1e-5)


def _np_ohem(logits, labels, thresh, min_kept, weights=None):
  """Reference: mmseg's OHEMPixelSampler selection, then the (weighted) mean CE of kept pixels."""
  valid = labels != IGNORE
  logp = _np_log_softmax(logits[valid])
  y = labels[valid]
  logp_y = logp[np.arange(len(y)), y]
  sort_prob = np.sort(np.exp(logp_y))
  batch_kept = min_kept * labels.shape[0]
  min_threshold = sort_prob[min(batch_kept, len(sort_prob) - 1)] if len(sort_prob) else 0.0
  kept = np.exp(logp_y) < max(min_threshold, thresh)
  w = (np.ones(logits.shape[-1]) if weights is None else np.asarray(weights))[y] * kept
  return (w * -logp_y).sum() / w.sum(), kept.sum(), valid.sum()


@pytest.mark.parametrize("thresh,min_kept,dominant", [
    (0.7, 100000, "min_kept"),  # more than the valid pixels: all but the most confident kept
    (0.05, 30, "min_kept"),     # p_y of the 60th smallest of ~100 valid pixels is above 0.05
    (0.9, 4, "thresh"),         # far more than 8 pixels have p_y < 0.9
])
def test_ohem_matches_mmseg_rule(thresh, min_kept, dominant):
  logits, labels = _data(seed=17, ignore_frac=0.2)
  weights = [1.0, 2.0, 0.5, 1.0, 3.0]
  want, n_kept, n_valid = _np_ohem(logits, labels, thresh, min_kept, weights)
  if dominant == "min_kept":
    assert n_kept == min(2 * min_kept, n_valid - 1)
  else:
    assert n_kept > 2 * min_kept
  fn = lambda x: losses.ohem_cross_entropy(x, labels, thresh=thresh, min_kept=min_kept,
                                           class_weights=weights)
  got, grad = jax.jit(jax.value_and_grad(fn))(logits)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Pixels that are valid but not kept get no gradient.
  assert np.sum(np.any(grad != 0.0, axis=-1)) == n_kept


def test_make_loss_new_losses_and_options():
  logits, labels = _data(seed=18, ignore_frac=0.1)
  w = [1.0, 2.0, 1.0, 1.0, 0.5]
  options = {"ohem": {"thresh": 0.8, "min_kept": 16}, "tversky": {"alpha": 0.3, "beta": 0.7},
             "lovasz": {"per_image": True}, "dice": {"smooth": 0.5}}  # dice: not in the spec
  fn = losses.make_loss({"lovasz": 1.0, "tversky": 0.5, "ohem": 2.0}, class_weights=w,
                        options=options)
  loss, aux = jax.jit(fn)(logits, labels)
  want = {"lovasz": losses.lovasz_softmax(logits, labels, per_image=True),
          "tversky": losses.tversky_loss(logits, labels, alpha=0.3, beta=0.7),
          "ohem": losses.ohem_cross_entropy(logits, labels, thresh=0.8, min_kept=16,
                                            class_weights=w)}
  assert set(aux) == set(want)
  for name, value in want.items():
    np.testing.assert_allclose(aux[name], value, rtol=1e-5)
  np.testing.assert_allclose(loss, want["lovasz"] + 0.5 * want["tversky"] + 2 * want["ohem"],
                             rtol=1e-5)
  assert abs(want["ohem"] - losses.ohem_cross_entropy(logits, labels, class_weights=w)) > 1e-3


@pytest.mark.parametrize("options,where", [
    ({"ohem": {"threshold": 0.7}}, "train.loss_options.ohem.threshold"),
    ({"lovasz": {"class_weights": [1.0] * K}}, "train.loss_options.lovasz.class_weights"),
    ({"ce": {"ignore_index": 0}}, "train.loss_options.ce.ignore_index"),
    ({"hinge": {}}, "train.loss_options.hinge"),
])
def test_make_loss_unknown_option_names_config_key(options, where):
  with pytest.raises(JaxsegError, match=where.replace(".", r"\.")):
    losses.make_loss({"ce": 1.0}, options=options)
