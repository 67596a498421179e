"""Superpixel graph datasets: every image of a split as a region graph, built once and cached.

Superpixels depend only on the image, so a split's graphs are built in one pass (SLIC in JAX,
batched on the default device, or scikit-image's) and kept on the host: a training step then
reads a few hundred nodes per image instead of decoding a frame. The pass is cached in
`WORKDIR/graphs/<split>.npz` (written to a temporary file and renamed, so a killed build never
leaves half a cache) under a key of every setting that shapes it; a resumed run reuses it.

Augmentation is a horizontal flip applied to the graph (`superpixels.hflip`), so the cache
serves every epoch.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Callable, Sequence

import numpy as np
from absl import logging
from PIL import Image
from tqdm import tqdm

from jaxseg.data import superpixels as sp
from jaxseg.data.files import BAD_KEY
from jaxseg.errors import JaxsegError

METHODS = ("jax", "skimage")

# What one RegionGraph is made of, and how each part is concatenated in the cache.
_NODE_FIELDS = ("nodes", "area", "targets", "ignore_fraction", "histogram")
_EDGE_FIELDS = ("edges", "senders", "receivers")


@dataclasses.dataclass
class GraphSet:
  """A split's region graphs (with targets and class histograms) and where they came from."""
  graphs: list[sp.RegionGraph]
  indices: np.ndarray  # the source index of each graph (bad examples skipped are missing)
  segments: dict[int, np.ndarray]  # segment maps of the examples kept for pictures, by index
  skipped: int = 0

  def __len__(self):
    return len(self.graphs)

  @property
  def max_nodes(self) -> int:
    return max(len(g.nodes) for g in self.graphs)

  @property
  def max_edges(self) -> int:
    return max(len(g.senders) for g in self.graphs)


@dataclasses.dataclass(frozen=True)
class Superpixels:
  """How images become segment maps: `method` "jax" (jaxseg.ops.slic) or "skimage".

  `scale` < 1 runs SLIC on a down-scaled copy and maps the segments back to full resolution
  (nearest), which keeps every pixel labelled and every metric at full resolution.
  """
  method: str = "jax"
  n_segments: int = 400
  compactness: float = 10.0
  sigma: float = 1.0
  scale: float = 1.0

  def __post_init__(self):
    if self.method not in METHODS:
      raise JaxsegError(f"unknown superpixels.method={self.method!r}; valid choices: "
                        f"{', '.join(METHODS)}")
    if not 0 < self.scale <= 1:
      raise JaxsegError(f"superpixels.scale={self.scale} must be in (0, 1]")
    if self.n_segments < 2:
      raise JaxsegError(f"superpixels.n_segments={self.n_segments} must be at least 2")

  def __call__(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Contiguous int32 segment ids 0..N-1 of each image, every segment connected."""
    small = [self._shrink(im) for im in images]
    if self.method == "skimage":
      segments = [sp.slic(im, n_segments=self.n_segments, compactness=self.compactness,
                          sigma=self.sigma) for im in small]
    else:
      segments = []
      for shape in dict.fromkeys(im.shape for im in small):  # one jit per image size
        group = [i for i, im in enumerate(small) if im.shape == shape]
        out = _jax_slic(shape[0], shape[1], self.n_segments, self.compactness, self.sigma)(
            np.stack([small[i] for i in group]))
        segments.extend(zip(group, np.asarray(out)))
      segments = [s for _, s in sorted(segments, key=lambda p: p[0])]
    return [sp.relabel(_grow(s, im.shape[:2])) for s, im in zip(segments, images)]

  def _shrink(self, image: np.ndarray) -> np.ndarray:
    if self.scale == 1:
      return image
    h, w = image.shape[:2]
    size = (max(1, round(w * self.scale)), max(1, round(h * self.scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


@functools.lru_cache(maxsize=8)
def _jax_slic(h: int, w: int, n_segments: int, compactness: float, sigma: float) -> Callable:
  import jax  # pylint: disable=g-import-not-at-top
  from jaxseg.ops import slic  # pylint: disable=g-import-not-at-top
  return jax.jit(functools.partial(slic.slic, grid=slic.grid_for(h, w, n_segments),
                                   compactness=compactness, sigma=sigma))


def _grow(segments: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """Nearest up-sampling to `shape` (monotone index maps keep segments connected)."""
  if segments.shape == shape:
    return segments
  rows = np.minimum((np.arange(shape[0]) + 0.5) * segments.shape[0] // shape[0],
                    segments.shape[0] - 1).astype(int)
  cols = np.minimum((np.arange(shape[1]) + 0.5) * segments.shape[1] // shape[1],
                    segments.shape[1] - 1).astype(int)
  return segments[rows][:, cols]


def pool(segments: np.ndarray, values: np.ndarray) -> np.ndarray:
  """Mean of per-pixel `values` (H, W, C) over each segment: float32 (N, C)."""
  seg = segments.ravel()
  n = int(seg.max()) + 1
  flat = values.reshape(seg.size, -1).astype(np.float64)
  area = np.bincount(seg, minlength=n)
  total = np.stack([np.bincount(seg, flat[:, c], n) for c in range(flat.shape[1])], -1)
  return (total / np.maximum(area, 1)[:, None]).astype(np.float32)


def build(source, superpixels: Superpixels, *, batch_size: int = 8,
          pixel_features: Callable | None = None, keep: Sequence[int] = (),
          desc: str = "graphs") -> GraphSet:
  """The region graph of every example of `source`, with a progress bar.

  `pixel_features(images uint8 (B, H, W, 3)) -> (B, H, W, C)` (e.g. a trained CNN's class
  probabilities) adds C node features: their mean over each superpixel. Examples a source
  skips (data.skip_bad_examples) are left out and counted; `keep` lists the indices whose
  segment maps are kept for pictures.
  """
  graphs, indices, kept, skipped = [], [], {}, 0
  keep = set(keep)
  bar = tqdm(total=len(source), desc=desc, unit="image", dynamic_ncols=True, mininterval=1.0)
  for start in range(0, len(source), batch_size):
    batch = []
    for i in range(start, min(start + batch_size, len(source))):
      example = source[i]
      if BAD_KEY in example:
        logging.warning("skipped bad example: %s", example[BAD_KEY])
        skipped += 1
      else:
        batch.append((i, example))
    if batch:
      images = [e["image"] for _, e in batch]
      all_segments = superpixels(images)
      extra = None
      if pixel_features is not None:
        same = len({im.shape for im in images}) == 1
        extra = (list(pixel_features(np.stack(images))) if same else
                 [pixel_features(im[None])[0] for im in images])
      for j, ((i, example), segments) in enumerate(zip(batch, all_segments)):
        graph = sp.region_graph(segments, example["image"], example["label"],
                                num_classes=source.num_classes,
                                ignore_index=source.ignore_index)
        if extra is not None:
          graph.nodes = np.concatenate([graph.nodes, pool(segments, extra[j])], -1)
        graphs.append(graph)
        indices.append(i)
        if i in keep:
          kept[i] = segments
    bar.update(min(batch_size, len(source) - start))
  bar.close()
  if not graphs:
    raise JaxsegError(f"{source!r}: no readable examples")
  return GraphSet(graphs, np.asarray(indices, np.int64), kept, skipped)


def cache_key(**settings) -> str:
  """A digest of everything that shapes a GraphSet (settings must be JSON-able or repr'd)."""
  text = json.dumps(settings, sort_keys=True, default=repr)
  return hashlib.sha1(text.encode()).hexdigest()


def save(path: str, graphs: GraphSet, key: str) -> None:
  """Writes `graphs` to `path` (.npz) atomically: a temporary file, fsynced, then renamed."""
  arrays = {"key": np.asarray(key), "indices": graphs.indices,
            "skipped": np.asarray(graphs.skipped),
            "n_node": np.asarray([len(g.nodes) for g in graphs.graphs]),
            "n_edge": np.asarray([len(g.senders) for g in graphs.graphs])}
  for field in _NODE_FIELDS + _EDGE_FIELDS:
    arrays[field] = np.concatenate([getattr(g, field) for g in graphs.graphs])
  for i, segments in graphs.segments.items():
    arrays[f"segments_{i}"] = segments
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def load(path: str, key: str) -> GraphSet | None:
  """The GraphSet cached at `path`, or None if there is none or it was built otherwise."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as data:
      if str(data["key"]) != key:
        logging.info("%s was built with other settings; rebuilding it", path)
        return None
      arrays = {k: data[k] for k in data.files}
  except (OSError, ValueError, KeyError) as e:
    logging.warning("%s is unreadable (%s); rebuilding it", path, e)
    return None
  node_ends = np.cumsum(arrays["n_node"])[:-1]
  edge_ends = np.cumsum(arrays["n_edge"])[:-1]
  parts = {f: np.split(arrays[f], node_ends) for f in _NODE_FIELDS}
  parts.update({f: np.split(arrays[f], edge_ends) for f in _EDGE_FIELDS})
  graphs = [sp.RegionGraph(**{f: parts[f][i] for f in parts}) for i in range(len(node_ends) + 1)]
  segments = {int(k.split("_")[1]): v for k, v in arrays.items() if k.startswith("segments_")}
  return GraphSet(graphs, arrays["indices"], segments, int(arrays["skipped"]))


def cached_build(path: str, source, superpixels: Superpixels, *, key_extra=None,
                 **kwargs) -> GraphSet:
  """`build`, or its cache at `path` when that was built from the same source and settings."""
  key = cache_key(source=repr(source), superpixels=dataclasses.asdict(superpixels),
                  keep=sorted(kwargs.get("keep", ())), extra=key_extra)
  graphs = load(path, key)
  if graphs is None:
    graphs = build(source, superpixels, **kwargs)
    save(path, graphs, key)
  return graphs


def device_batch(graphs: Sequence[sp.RegionGraph], num_devices: int, *, nodes_per_graph: int,
                 edges_per_graph: int, graphs_per_device: int, ignore_index: int = 255):
  """`graphs` split into `num_devices` padded GraphsTuples stacked on a leading device axis.

  Each device holds up to `graphs_per_device` graphs padded to the same budget, so one
  compilation serves every batch; a short last batch leaves whole devices empty (padding).
  """
  import jax  # pylint: disable=g-import-not-at-top
  if len(graphs) > num_devices * graphs_per_device:
    raise JaxsegError(f"{len(graphs)} graphs do not fit {num_devices} devices x "
                      f"{graphs_per_device}")
  shares = [list(graphs[d * graphs_per_device:(d + 1) * graphs_per_device])
            for d in range(num_devices)]
  # jraph cannot batch zero graphs: an empty device gets a copy of the first graph that
  # counts nowhere (every target ignored, so weight 0, and an all-zero class histogram).
  blank = _counts_nowhere(graphs[0], ignore_index)
  parts = [sp.batch_graphs(share or [blank],
                           max_nodes=graphs_per_device * nodes_per_graph + 1,
                           max_edges=graphs_per_device * edges_per_graph,
                           n_graph=graphs_per_device + 1, ignore_index=ignore_index)
           for share in shares]
  return jax.tree.map(lambda *xs: np.stack(xs), *parts)


def _counts_nowhere(graph: sp.RegionGraph, ignore_index: int) -> sp.RegionGraph:
  targets = np.full(len(graph.nodes), ignore_index, np.uint8)
  histogram = None if graph.histogram is None else np.zeros_like(graph.histogram)
  return dataclasses.replace(graph, targets=targets, histogram=histogram)
