"""Superpixel region graphs: SLIC segments become the nodes of a region adjacency graph.

`slic` is scikit-image's SLIC, the reference. `region_graph` turns a segment map (and an image,
and optionally a label map) into node features, edge features, adjacency and node targets with
numpy reductions (`bincount`), and `to_graphs_tuple` / `pad_graphs` make jraph GraphsTuples
padded to fixed node/edge budgets, so one compilation of a graph network serves every batch.

Node features (13): mean and std of the Lab colour (L/100, a/128, b/128), centroid (y, x)
of the pixel centres as a fraction of the image, area as a fraction of the image, bounding box (y0, x0, y1, x1) as
fractions. Edge features (5): the Lab mean difference (3, same scaling), the centroid distance
(fraction of the image diagonal) and the shared boundary length (pixel contacts over the
smaller region's perimeter scale, 4 sqrt(area)). Edges are 4-connected adjacencies, stored
in both directions.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxseg.errors import JaxsegError

NODE_FEATURES = 13
EDGE_FEATURES = 5


def slic(image: np.ndarray, n_segments: int = 400, compactness: float = 10.0,
         sigma: float = 1.0) -> np.ndarray:
  """scikit-image's SLIC (Achanta et al., 2012) on an RGB uint8 image: int32 (H, W) segment
  ids 0..N-1, every segment connected."""
  try:
    from skimage import segmentation  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise JaxsegError("superpixels need scikit-image: pip install scikit-image") from e
  segments = segmentation.slic(image, n_segments=n_segments, compactness=compactness,
                               sigma=sigma, start_label=0, channel_axis=-1)
  return relabel(segments)


def relabel(segments: np.ndarray) -> np.ndarray:
  """Segment ids made contiguous 0..N-1 in order of first appearance in raster order."""
  flat = segments.ravel()
  _, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
  order = np.argsort(np.argsort(first))  # rank of each id by its first pixel
  return order[inverse].reshape(segments.shape).astype(np.int32)


def adjacency(segments: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """4-connected region adjacency: (senders, receivers, contacts), both directions, sorted.

  `contacts` counts the pixel pairs (horizontal and vertical neighbours) across the boundary:
  the shared boundary length in pixel edges.
  """
  n = int(segments.max()) + 1
  a = np.concatenate([segments[:, :-1].ravel(), segments[:-1, :].ravel()]).astype(np.int64)
  b = np.concatenate([segments[:, 1:].ravel(), segments[1:, :].ravel()]).astype(np.int64)
  cut = a != b
  a, b = a[cut], b[cut]
  pairs = np.concatenate([a * n + b, b * n + a])  # both directions
  keys, contacts = np.unique(pairs, return_counts=True)
  return (keys // n).astype(np.int32), (keys % n).astype(np.int32), contacts.astype(np.int32)


def _lab(image: np.ndarray) -> np.ndarray:
  from skimage import color  # pylint: disable=g-import-not-at-top
  lab = color.rgb2lab(image).astype(np.float32)
  return lab / np.array([100.0, 128.0, 128.0], np.float32)


@dataclasses.dataclass
class RegionGraph:
  """One image's region adjacency graph (numpy); see the module docstring for the features."""
  nodes: np.ndarray  # float32 (N, NODE_FEATURES)
  edges: np.ndarray  # float32 (E, EDGE_FEATURES)
  senders: np.ndarray  # int32 (E,)
  receivers: np.ndarray  # int32 (E,)
  area: np.ndarray  # int32 (N,) pixels per segment
  targets: np.ndarray | None = None  # uint8 (N,) majority label, ignore_index if none
  ignore_fraction: np.ndarray | None = None  # float32 (N,) share of ignored pixels
  # int32 (N, num_classes): labelled pixels of each class per node. The pixel confusion matrix
  # of any node labelling is a sum of these rows, so metrics need no painted label maps.
  histogram: np.ndarray | None = None


def region_graph(segments: np.ndarray, image: np.ndarray, label: np.ndarray | None = None, *,
                 num_classes: int | None = None, ignore_index: int = 255) -> RegionGraph:
  """Nodes, edges and (with `label`) node targets of segment map `segments` (ids 0..N-1)."""
  h, w = segments.shape
  if image.shape[:2] != (h, w):
    raise JaxsegError(f"segments are {h}x{w} but the image is {image.shape[0]}x{image.shape[1]}")
  seg = segments.ravel().astype(np.int64)
  n = int(seg.max()) + 1
  area = np.bincount(seg, minlength=n)
  if (area == 0).any():
    raise JaxsegError(f"segment ids must be contiguous 0..{n - 1}; "
                      f"{int(np.flatnonzero(area == 0)[0])} has no pixel (use relabel)")
  safe = area.astype(np.float64)
  lab = _lab(image).reshape(-1, 3).astype(np.float64)
  mean = np.stack([np.bincount(seg, lab[:, c], n) for c in range(3)], -1) / safe[:, None]
  square = np.stack([np.bincount(seg, lab[:, c] ** 2, n) for c in range(3)], -1) / safe[:, None]
  std = np.sqrt(np.maximum(square - mean ** 2, 0.0))
  ys, xs = np.divmod(np.arange(h * w), w)
  centroid = np.stack([np.bincount(seg, ys, n), np.bincount(seg, xs, n)], -1) / safe[:, None]
  box = np.stack([_segment_min(seg, ys, n), _segment_min(seg, xs, n),
                  _segment_max(seg, ys, n) + 1, _segment_max(seg, xs, n) + 1], -1)
  scale = np.array([h, w], np.float64)
  # Pixel centres: the mirror image's centroid is then exactly 1 - x (see hflip).
  nodes = np.concatenate([mean, std, (centroid + 0.5) / scale, (area / (h * w))[:, None],
                          box / np.tile(scale, 2)], -1).astype(np.float32)

  senders, receivers, contacts = adjacency(segments)
  colour = mean[senders] - mean[receivers]
  distance = np.linalg.norm(centroid[senders] - centroid[receivers], axis=-1) / np.hypot(h, w)
  perimeter = 4.0 * np.sqrt(np.minimum(area[senders], area[receivers]))
  edges = np.concatenate([colour, distance[:, None], (contacts / perimeter)[:, None]],
                         -1).astype(np.float32)

  graph = RegionGraph(nodes, edges, senders, receivers, area.astype(np.int32))
  if label is not None:
    if num_classes is None:
      raise JaxsegError("region_graph: num_classes is needed with a label map")
    histogram = class_histogram(segments, label, num_classes, ignore_index)
    graph.targets, graph.ignore_fraction = _majority(histogram, ignore_index)
    graph.histogram = histogram[:, :num_classes].astype(np.int32)
  return graph


def _segment_min(seg, values, n):
  out = np.full(n, np.iinfo(np.int64).max, np.int64)
  np.minimum.at(out, seg, values)
  return out


def _segment_max(seg, values, n):
  out = np.full(n, -1, np.int64)
  np.maximum.at(out, seg, values)
  return out


def class_histogram(segments: np.ndarray, label: np.ndarray, num_classes: int,
                    ignore_index: int = 255) -> np.ndarray:
  """int64 (N, num_classes + 1): pixels of each class per segment; the last column counts
  ignored pixels."""
  seg = segments.ravel().astype(np.int64)
  lab = label.ravel().astype(np.int64)
  lab = np.where(lab == ignore_index, num_classes, lab)
  if (lab > num_classes).any():
    raise JaxsegError(f"label values outside 0..{num_classes - 1} and {ignore_index}")
  n = int(seg.max()) + 1
  return np.bincount(seg * (num_classes + 1) + lab,
                     minlength=n * (num_classes + 1)).reshape(n, num_classes + 1)


def node_targets(segments: np.ndarray, label: np.ndarray, num_classes: int,
                 ignore_index: int = 255) -> tuple[np.ndarray, np.ndarray]:
  """(majority class per segment, ignore_index where all its pixels are ignored; the share of
  ignored pixels). Ties go to the lower class id."""
  return _majority(class_histogram(segments, label, num_classes, ignore_index), ignore_index)


def _majority(histogram: np.ndarray, ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
  """node_targets of a class_histogram (its last column counts ignored pixels)."""
  counted = histogram[:, :-1]
  targets = np.where(counted.sum(1) > 0, counted.argmax(1), ignore_index).astype(np.uint8)
  return targets, (histogram[:, -1] / histogram.sum(1)).astype(np.float32)


def nodes_to_pixels(segments: np.ndarray, node_values: np.ndarray) -> np.ndarray:
  """Paints each segment with its node's value (class, or a row of logits)."""
  return np.asarray(node_values)[segments]


def oracle_labels(segments: np.ndarray, label: np.ndarray, num_classes: int,
                  ignore_index: int = 255) -> np.ndarray:
  """The best any superpixel classifier can do: every segment takes its majority label."""
  targets, _ = node_targets(segments, label, num_classes, ignore_index)
  return nodes_to_pixels(segments, targets)


def hflip(graph: RegionGraph) -> RegionGraph:
  """The graph of the horizontally mirrored image: x centroid and box mirrored (features past
  the 13 geometric/colour ones, e.g. pooled CNN features, are kept); edges are unchanged."""
  nodes = graph.nodes.copy()
  nodes[:, 7] = 1.0 - graph.nodes[:, 7]
  nodes[:, 10], nodes[:, 12] = 1.0 - graph.nodes[:, 12], 1.0 - graph.nodes[:, 10]
  return dataclasses.replace(graph, nodes=nodes)


def batch_graphs(graphs: list[RegionGraph], *, max_nodes: int, max_edges: int,
                 n_graph: int | None = None, ignore_index: int = 255):
  """One jraph.GraphsTuple of `graphs`, padded to exactly `max_nodes` nodes, `max_edges` edges
  and `n_graph` graphs (default len(graphs) + 1): the same shapes for every batch, including
  a last, smaller one.

  Nodes carry {"features", "target", "weight" (pixel count; 0 for padding and for
  all-ignored segments)} and "histogram" when every graph has one; edges carry their features.
  """
  import jraph  # pylint: disable=g-import-not-at-top
  nodes = sum(len(g.nodes) for g in graphs)
  edges = sum(len(g.senders) for g in graphs)
  # pad_with_graphs needs room for at least one padding node.
  if nodes + 1 > max_nodes or edges > max_edges:
    raise JaxsegError(f"the batch has {nodes} superpixels and {edges} edges but the budget is "
                      f"{max_nodes - 1} and {max_edges}; raise the budget or lower n_segments")
  n_graph = len(graphs) + 1 if n_graph is None else n_graph
  if n_graph < len(graphs) + 1:
    raise JaxsegError(f"n_graph={n_graph} leaves no room for the padding graph of "
                      f"{len(graphs)} graphs")
  with_histogram = all(g.histogram is not None for g in graphs)
  tuples = []
  for g in graphs:
    target = (g.targets if g.targets is not None
              else np.full(len(g.nodes), ignore_index, np.uint8)).astype(np.int32)
    weight = np.where(target == ignore_index, 0.0, g.area).astype(np.float32)
    nodes = {"features": g.nodes, "target": target, "weight": weight}
    if with_histogram:
      nodes["histogram"] = g.histogram
    tuples.append(jraph.GraphsTuple(
        nodes=nodes, edges=g.edges,
        senders=g.senders, receivers=g.receivers, n_node=np.array([len(g.nodes)], np.int32),
        n_edge=np.array([len(g.senders)], np.int32), globals=None))
  batch = jraph.batch_np(tuples)
  return jraph.pad_with_graphs(batch, n_node=max_nodes, n_edge=max_edges, n_graph=n_graph)


def boundaries(labels: np.ndarray, ignore_index: int | None = None) -> np.ndarray:
  """Pixels whose right or lower neighbour differs (ignored pixels are never boundaries)."""
  edge = np.zeros(labels.shape, bool)
  edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
  edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
  if ignore_index is not None:
    ignored = labels == ignore_index
    edge &= ~ignored
    edge[:, :-1] &= ~ignored[:, 1:]
    edge[:-1, :] &= ~ignored[1:, :]
  return edge


def boundary_recall(segments: np.ndarray, label: np.ndarray, tolerance: int = 2,
                    ignore_index: int = 255) -> float:
  """Share of ground-truth boundary pixels within `tolerance` pixels (Chebyshev) of a
  superpixel boundary (Achanta et al.'s SLIC evaluation)."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  truth = boundaries(label, ignore_index)
  if not truth.any():
    return 1.0
  near = ndimage.binary_dilation(boundaries(segments),
                                 np.ones((2 * tolerance + 1,) * 2, bool))
  return float((truth & near).sum() / truth.sum())


def undersegmentation_error(segments: np.ndarray, label: np.ndarray, num_classes: int,
                            ignore_index: int = 255) -> float:
  """Neubert & Protzel's corrected under-segmentation error: the pixels each superpixel would
  have to give up, min(|s in g|, |s out of g|) summed over the ground-truth regions g it
  touches, over the labelled pixels (regions are the label classes; ignored pixels left out)."""
  histogram = class_histogram(segments, label, num_classes, ignore_index)[:, :num_classes]
  inside = histogram
  outside = histogram.sum(1, keepdims=True) - histogram
  leak = np.where(histogram > 0, np.minimum(inside, outside), 0).sum()
  return float(leak / max(histogram.sum(), 1))
