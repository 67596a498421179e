"""Superpixel region graphs against brute-force references on tiny label maps; skimage's SLIC
segments are connected and cover the image; jraph padding keeps every batch one shape."""

import numpy as np
import pytest
from scipy import ndimage
from skimage import color

from jaxseg.data import superpixels as sp
from jaxseg.errors import JaxsegError
from tests import helpers

RNG = np.random.default_rng(0)


def _tiny_segments(seed, h=7, w=9, n=5):
  """Random blobs (not necessarily connected: the graph code must not assume it)."""
  rng = np.random.default_rng(seed)
  return sp.relabel(rng.integers(0, n, (h, w)))


def _brute_adjacency(segments):
  contacts = {}
  h, w = segments.shape
  for y in range(h):
    for x in range(w):
      for dy, dx in ((0, 1), (1, 0)):
        if y + dy < h and x + dx < w:
          a, b = int(segments[y, x]), int(segments[y + dy, x + dx])
          if a != b:
            contacts[(a, b)] = contacts.get((a, b), 0) + 1
            contacts[(b, a)] = contacts.get((b, a), 0) + 1
  return contacts


@pytest.mark.parametrize("seed", range(4))
def test_adjacency_equals_brute_force(seed):
  segments = _tiny_segments(seed)
  senders, receivers, contacts = sp.adjacency(segments)
  got = {(int(s), int(r)): int(c) for s, r, c in zip(senders, receivers, contacts)}
  assert got == _brute_adjacency(segments)


@pytest.mark.parametrize("seed", range(3))
def test_node_features_equal_per_segment_masks(seed):
  segments = _tiny_segments(seed)
  h, w = segments.shape
  image = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
  graph = sp.region_graph(segments, image)
  lab = color.rgb2lab(image) / np.array([100.0, 128.0, 128.0])
  assert graph.nodes.shape == (segments.max() + 1, sp.NODE_FEATURES)
  for k in range(segments.max() + 1):
    mask = segments == k
    ys, xs = np.nonzero(mask)
    want = np.concatenate([lab[mask].mean(0), lab[mask].std(0), [(ys.mean() + 0.5) / h, (xs.mean() + 0.5) / w],
                           [mask.sum() / (h * w)],
                           [ys.min() / h, xs.min() / w, (ys.max() + 1) / h, (xs.max() + 1) / w]])
    np.testing.assert_allclose(graph.nodes[k], want, rtol=1e-4, atol=1e-5)
  assert graph.edges.shape == (len(graph.senders), sp.EDGE_FEATURES)
  # Edge features are antisymmetric in colour and symmetric in distance and boundary.
  index = {(int(s), int(r)): i for i, (s, r) in enumerate(zip(graph.senders, graph.receivers))}
  for (s, r), i in index.items():
    j = index[(r, s)]
    np.testing.assert_allclose(graph.edges[i, :3], -graph.edges[j, :3], atol=1e-6)
    np.testing.assert_allclose(graph.edges[i, 3:], graph.edges[j, 3:], atol=1e-6)


def test_node_targets_take_the_majority_and_report_ignored_pixels():
  segments = np.array([[0, 0, 0, 1], [0, 0, 1, 1], [2, 2, 2, 2]])
  label = np.array([[3, 3, 1, 255], [255, 3, 255, 255], [0, 1, 1, 0]])
  targets, ignored = sp.node_targets(segments, label, num_classes=4)
  assert targets.tolist() == [3, 255, 0]  # segment 2: 0 and 1 tie -> the lower id
  np.testing.assert_allclose(ignored, [1 / 5, 1.0, 0.0])


def test_oracle_is_perfect_when_segments_follow_the_labels():
  label = np.array([[0, 0, 1], [2, 2, 1], [2, 255, 1]])
  segments = sp.relabel(label)
  np.testing.assert_array_equal(sp.oracle_labels(segments, label, 3)[label != 255],
                                label[label != 255])


def test_batch_is_padded_to_the_budget():
  image = RNG.integers(0, 256, (7, 9, 3), dtype=np.uint8)
  graphs = [sp.region_graph(_tiny_segments(s), image, RNG.integers(0, 3, (7, 9)), num_classes=3)
            for s in range(2)]
  batch = sp.batch_graphs(graphs, max_nodes=32, max_edges=64)
  assert batch.nodes["features"].shape == (32, sp.NODE_FEATURES)
  assert batch.edges.shape == (64, sp.EDGE_FEATURES) and batch.n_node.shape == (3,)
  real = sum(len(g.nodes) for g in graphs)
  assert batch.n_node[:2].tolist() == [len(g.nodes) for g in graphs]
  assert (batch.nodes["weight"][real:] == 0).all() and (batch.nodes["weight"][:real] > 0).all()
  with pytest.raises(JaxsegError, match=r"budget is 9 and 64"):
    sp.batch_graphs(graphs, max_nodes=10, max_edges=64)


def test_skimage_slic_segments_are_connected_and_cover_a_camvid_frame():
  from jaxseg.data import CamVid  # pylint: disable=g-import-not-at-top
  image = CamVid("val", data_dir=str(helpers.CAMVID))[0]["image"][::2, ::2]
  segments = sp.slic(image, n_segments=100)
  n = segments.max() + 1
  assert segments.shape == image.shape[:2] and 50 <= n <= 150
  assert set(np.unique(segments)) == set(range(n))  # ids 0..N-1, every pixel labelled
  for k in range(n):
    _, components = ndimage.label(segments == k)
    assert components == 1, k
