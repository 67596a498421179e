"""SLIC in JAX: Lab conversion equals skimage's; segments are connected, labelled and cover
the image; quality on CamVid is at least skimage's within a few points; batching is exact."""

import functools

import jax
import numpy as np
import pytest
from scipy import ndimage
from skimage import color

from jaxseg.data import CamVid, superpixels as sp
from jaxseg.ops import slic as jslic
from tests import helpers


@pytest.fixture(scope="module")
def frames():
  source = CamVid("val", data_dir=str(helpers.CAMVID))
  # Half resolution keeps the test fast; every 50th frame for variety.
  return [{k: source[i][k][::2, ::2] for k in ("image", "label")} for i in (0, 50, 100)]


def test_rgb_to_lab_matches_skimage(frames):
  image = frames[0]["image"]
  np.testing.assert_allclose(np.asarray(jslic.rgb_to_lab(image)), color.rgb2lab(image),
                             atol=2e-2)


@pytest.fixture(scope="module")
def segmented(frames):
  grid = jslic.grid_for(180, 240, 150)
  run = jax.jit(functools.partial(jslic.slic, grid=grid))
  images = np.stack([f["image"] for f in frames])
  return grid, np.asarray(run(images)), run


def test_segments_are_connected_and_cover_the_image(segmented):
  grid, batch, _ = segmented
  for segments in batch:
    assert segments.shape == (180, 240) and segments.dtype == np.int32
    ids = np.unique(segments)
    assert ids.min() >= 0 and ids.max() < grid[0] * grid[1]
    assert len(ids) >= 0.8 * grid[0] * grid[1]  # few centres lose all their pixels
    for k in ids:
      assert ndimage.label(segments == k)[1] == 1, k


def test_batching_is_exact(frames, segmented):
  _, batch, run = segmented
  np.testing.assert_array_equal(np.asarray(run(frames[1]["image"][None]))[0], batch[1])


def test_quality_is_at_least_skimages_within_a_few_points(frames, segmented):
  _, batch, _ = segmented
  for frame, mine in zip(frames, batch):
    reference = sp.slic(frame["image"], n_segments=150)
    recall = [sp.boundary_recall(s, frame["label"]) for s in (mine, reference)]
    error = [sp.undersegmentation_error(s, frame["label"], 11) for s in (mine, reference)]
    assert recall[0] >= recall[1] - 0.05, recall
    assert error[0] <= error[1] + 0.03, error


def test_quality_metrics_on_perfect_segments():
  label = np.array([[0, 0, 1, 1], [0, 2, 2, 1], [2, 2, 255, 1]])
  segments = sp.relabel(label)
  assert sp.boundary_recall(segments, label) == 1.0
  assert sp.undersegmentation_error(segments, label, 3) == 0.0
  one = np.zeros_like(label)  # one superpixel for everything
  assert sp.boundary_recall(one, label) == 0.0
  assert sp.undersegmentation_error(one, label, 3) == pytest.approx((4 + 3 + 4) / 11)
