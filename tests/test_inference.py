"""Sliding-window inference, test-time augmentation and ensembles (jaxseg.inference,
jaxseg.evaluate.Ensemble) on toy models whose answers are known."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import unet as unet_config
from jaxseg import inference
from jaxseg.evaluate import Ensemble
from jaxseg.errors import JaxsegError
from jaxseg.models import create_model
from jaxseg.runs import Run
from jaxseg.train.workdir import Classes


@pytest.mark.parametrize("size, window", [(10, 4), (9, 9), (7, 10), (20, 6)])
def test_window_starts_cover_the_image(size, window):
  starts = inference.window_starts(size, window)
  covered = np.zeros(size, bool)
  for s in starts:
    covered[s:s + window] = True
    assert 0 <= s and s + min(window, size) <= size
  assert covered.all()


def test_sliding_window_equals_whole_image_for_a_per_pixel_model():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(2, 21, 30, 3)), jnp.float32)
  weights = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  apply = lambda x: x @ weights  # a 1x1 conv: context-free, so windows cannot change it
  np.testing.assert_allclose(inference.sliding_logits(apply, images, (8, 12), 5), apply(images),
                             rtol=1e-5, atol=1e-5)


class _Conv(nn.Module):
  """Two 3x3 convs: context-dependent, so a window smaller than the image changes the answer.
  `mirror_symmetric` makes every kernel equal its left-right mirror: the model then commutes
  with horizontal flips."""
  mirror_symmetric: bool = False

  @nn.compact
  def __call__(self, x):
    for i, features in enumerate((8, 5)):
      kernel = self.param(f"kernel{i}", nn.initializers.normal(0.5), (3, 3, x.shape[-1],
                                                                       features))
      if self.mirror_symmetric:
        kernel = (kernel + kernel[:, ::-1]) / 2
      x = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      x = jnp.tanh(x) if i == 0 else x
    return x


def _toy(mirror_symmetric=False, seed=0):
  model = _Conv(mirror_symmetric)
  images = jnp.asarray(np.random.default_rng(seed).normal(size=(2, 20, 28, 3)), jnp.float32)
  params = model.init(jax.random.key(seed), images)
  return (lambda x: model.apply(params, x)), images


@pytest.mark.parametrize("window", [(20, 28), (32, 40)])
def test_sliding_window_equals_whole_image_when_the_window_covers_it(window):
  apply, images = _toy()
  whole = inference.predict(apply, images, 5)
  np.testing.assert_array_equal(inference.predict(apply, images, 5, window=window), whole)
  # A smaller window sees less context near its edges: the test above can fail.
  assert not np.allclose(inference.predict(apply, images, 5, window=(8, 12)), whole, atol=1e-3)


def test_flip_tta_of_a_flip_equivariant_model_equals_the_plain_prediction():
  apply, images = _toy(mirror_symmetric=True)
  plain = inference.predict(apply, images, 5)
  flipped = inference.predict(apply, images, 5, tta=inference.TTA(flip=True))
  np.testing.assert_allclose(flipped, plain, rtol=1e-5, atol=1e-6)
  apply, _ = _toy(mirror_symmetric=False)  # not equivariant: the views disagree
  assert not np.allclose(inference.predict(apply, images, 5, tta=inference.TTA(flip=True)),
                         inference.predict(apply, images, 5), atol=1e-3)


def test_multi_scale_tta_is_the_mean_of_its_views_at_the_input_size():
  apply, images = _toy()
  scales = (0.5, 1.0, 1.5)
  tta = inference.predict(apply, images, 5, tta=inference.TTA(scales, flip=True))
  assert tta.shape == (2, 20, 28, 5)
  np.testing.assert_allclose(tta.sum(-1), 1.0, rtol=1e-5)
  views = [inference.predict(apply, x, 5, tta=inference.TTA((s,)))
           for s in scales for x in (images, images[:, :, ::-1])]
  views = [v if i % 2 == 0 else v[:, :, ::-1] for i, v in enumerate(views)]
  np.testing.assert_allclose(tta, np.mean(views, 0), rtol=1e-5, atol=1e-6)
  # A view at scale 0.5 runs the model on a 10x14 image and brings its logits back to 20x28.
  half = inference.predict(apply, images, 5, tta=inference.TTA((0.5,)))
  small = jax.nn.softmax(jax.image.resize(apply(jax.image.resize(
      images, (2, 10, 14, 3), "bilinear", antialias=False)), (2, 20, 28, 5), "bilinear"), -1)
  np.testing.assert_allclose(half, small, rtol=1e-5, atol=1e-6)


def test_tta_settings_are_checked_and_described():
  assert inference.DEFAULT_TTA.num_views == 12
  assert inference.DEFAULT_TTA.describe() == "scales 0.5, 0.75, 1, 1.25, 1.5, 1.75 + flip"
  assert inference.NO_TTA.describe() == "none"
  with pytest.raises(JaxsegError, match="must be positive"):
    inference.TTA((0.0, 1.0))


def _run(seed: int, classes=("a", "b", "c")) -> Run:
  config = unet_config.get_config()
  config.model.name = "unet"
  model = create_model("unet", num_classes=len(classes), features=4, depth=2)
  variables = model.init(jax.random.key(seed), jnp.zeros((1, 16, 16, 3)), train=False)
  palette = np.arange(3 * len(classes), dtype=np.uint8).reshape(-1, 3)
  return Run(config, model, variables, lambda x: x.astype(jnp.float32) / 255.0, len(classes),
             0, Classes(tuple(classes), palette), workdir=f"run{seed}")


def test_an_ensemble_of_one_run_equals_the_run_and_weights_mix_probabilities():
  a, b = _run(0), _run(1)
  images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  pa, pb = a.probabilities(images), b.probabilities(images)
  np.testing.assert_allclose(Ensemble([a]).probabilities(images), pa, rtol=1e-6)
  np.testing.assert_allclose(Ensemble([a, b], [3, 1]).probabilities(images),
                             0.75 * pa + 0.25 * pb, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(Ensemble([a, b], [0, 2]).probabilities(images), pb, rtol=1e-6)
  assert not np.allclose(pa, pb, atol=1e-3)  # the members differ, so the mixing is visible


@pytest.mark.parametrize("weights, members, message", [
    ([1.0], 2, "1 weights for 2 runs"),
    ([-1.0, 2.0], 2, "non-negative with a positive sum"),
    (None, 0, "at least one run"),
])
def test_ensemble_arguments_are_checked(weights, members, message):
  with pytest.raises(JaxsegError, match=message):
    Ensemble([_run(i) for i in range(members)], weights)


def test_an_ensemble_refuses_runs_with_other_classes():
  with pytest.raises(JaxsegError, match="run1 predicts 2 classes .* the same classes"):
    Ensemble([_run(0), _run(1, classes=("a", "x"))])
