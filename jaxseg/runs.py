"""A finished (or checkpointed) run as a model to run: `load_run(workdir)`.

A run directory holds `config.json` and `classes.json` (written by the training loops) and
Orbax checkpoints; the model is rebuilt from the config and its latest checkpoint restored,
checked against the model's parameter shapes, with the input preprocessing it was trained with.

Every run answers `probabilities(images uint8 (B, H, W, 3), tta=..., window=...)` with float32
(B, H, W, K) class probabilities, so that evaluation, ensembles and prediction treat a CNN and
the superpixel GNN alike.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxseg import inference, weights
from jaxseg.data.preprocess import make_normalize
from jaxseg.errors import JaxsegError
from jaxseg.inference import NO_TTA, TTA
from jaxseg.models import create_model
from jaxseg.train import sharding, xla_stats
from jaxseg.train.checkpoint import Checkpointer, param_shapes

CLASSES_FILE = "classes.json"


@dataclasses.dataclass(frozen=True, eq=False)
class Classes:
  """What a run predicts: class names, their colours and the label value that means 'void'."""
  names: tuple[str, ...]
  palette: np.ndarray  # uint8 (K, 3)
  ignore_index: int = 255
  dataset: str = ""

  @classmethod
  def of(cls, source, dataset: str = "") -> "Classes":
    return cls(tuple(source.class_names), np.asarray(source.palette, np.uint8),
               int(source.ignore_index), dataset)


def save_classes(workdir: str, source, dataset: str) -> None:
  """WORKDIR/classes.json: what prediction needs without the dataset on disk."""
  if jax.process_index() != 0:
    return
  c = Classes.of(source, dataset)
  tmp = os.path.join(workdir, CLASSES_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"class_names": list(c.names), "palette": c.palette.tolist(),
               "ignore_index": c.ignore_index, "dataset": dataset}, f, indent=1)
  os.replace(tmp, os.path.join(workdir, CLASSES_FILE))


def _load_classes(workdir: str, config) -> Classes:
  """classes.json, or (runs trained before it was written) the classes of the run's dataset."""
  path = os.path.join(workdir, CLASSES_FILE)
  if os.path.exists(path):
    with open(path) as f:
      c = json.load(f)
    return Classes(tuple(c["class_names"]), np.asarray(c["palette"], np.uint8),
                   int(c["ignore_index"]), c.get("dataset", ""))
  from jaxseg.data import from_config  # pylint: disable=g-import-not-at-top
  return Classes.of(from_config.make_source(config, config.data.val_split), config.data.name)


@dataclasses.dataclass
class Run:
  """A trained CNN: `logits` and `probabilities` of uint8 images, jitted once per input shape
  and test mode."""
  config: ml_collections.ConfigDict
  model: Any
  variables: dict
  preprocess: Callable
  num_classes: int
  step: int
  classes: Classes
  workdir: str = ""

  def __post_init__(self):
    model, preprocess, k = self.model, self.preprocess, self.num_classes

    def probabilities(variables, images, tta, window):
      apply = lambda x: model.apply(variables, x, train=False).astype(jnp.float32)
      return inference.predict(apply, preprocess(images), k, tta=tta, window=window)

    # Compiled once per run (jit caches by the function object) and per static setting.
    self._logits = jax.jit(lambda variables, images: model.apply(
        variables, preprocess(images), train=False).astype(jnp.float32))
    self._probabilities = jax.jit(probabilities, static_argnames=("tta", "window"))

  @property
  def name(self) -> str:
    return "/".join(filter(None, (self.config.model.name, self.config.model.get("backbone"))))

  def logits(self, images):
    return self._logits(self.variables, images)

  def probabilities(self, images, tta: TTA = NO_TTA, window: tuple[int, int] | None = None):
    return self._probabilities(self.variables, images, tta=tta,
                               window=None if window is None else tuple(window))

  def forward_flops(self, image_shape) -> float | None:
    """XLA's FLOP count of one forward pass on one image of `image_shape` (H, W, 3)."""
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.uint8)
    return xla_stats.flops(self._logits.lower(self.variables, x).cost_analysis())


@dataclasses.dataclass
class GraphRun:
  """A trained superpixel GNN as a pixel classifier: SLIC superpixels of each image become a
  region graph (plus, in hybrid mode, its CNN's probabilities), the GNN labels the nodes, and
  each superpixel is painted with its node's class probabilities."""
  config: ml_collections.ConfigDict
  model: Any
  params: Any
  superpixels: Any
  num_classes: int
  step: int
  classes: Classes
  cnn: Run | None = None
  workdir: str = ""

  def __post_init__(self):
    model = self.model
    self._apply = jax.jit(lambda params, graph: model.apply({"params": params}, graph,
                                                            train=False))

  @property
  def name(self) -> str:
    return "superpixel_gnn" + (f" (hybrid on {self.cnn.name})" if self.cnn else "")

  def _graphs(self, images: np.ndarray):
    from jaxseg.data import graph_data, superpixels as sp  # pylint: disable=g-import-not-at-top
    segments = self.superpixels(list(images))
    extra = None if self.cnn is None else np.asarray(self.cnn.probabilities(images))
    graphs = []
    for i, (image, segs) in enumerate(zip(images, segments)):
      g = sp.region_graph(segs, image, num_classes=self.num_classes,
                          ignore_index=self.classes.ignore_index)
      if extra is not None:
        g.nodes = np.concatenate([g.nodes, graph_data.pool(segs, extra[i])], -1)
      graphs.append(g)
    nodes = sum(len(g.nodes) for g in graphs)
    edges = sum(len(g.senders) for g in graphs)
    # Padded to a power of two: a handful of compilations however the counts vary.
    batch = sp.batch_graphs(graphs, max_nodes=_pow2(nodes + 1), max_edges=_pow2(edges),
                            n_graph=len(graphs) + 1)
    return segments, graphs, batch

  def _view(self, images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:  # a rescaled view
      images = np.clip(np.round(images), 0, 255).astype(np.uint8)
    segments, graphs, batch = self._graphs(images)
    probabilities = np.asarray(jax.nn.softmax(self._apply(self.params, batch), -1))
    offsets = np.cumsum([0] + [len(g.nodes) for g in graphs])
    return np.stack([probabilities[offsets[i]:offsets[i + 1]][s]
                     for i, s in enumerate(segments)])

  def probabilities(self, images, tta: TTA = NO_TTA, window: tuple[int, int] | None = None):
    """Whole images always (its superpixels span the image): `window` does not apply."""
    del window
    images = np.asarray(jax.device_get(images))
    return jnp.asarray(inference.tta_scores(self._view, images, tta, logits=False))

  def forward_flops(self, image_shape) -> float | None:
    """XLA's FLOP count of the GNN on one image's graph (superpixels and features excluded)."""
    _, _, batch = self._graphs(np.zeros((1, *image_shape), np.uint8) + 128)
    return xla_stats.flops(self._apply.lower(self.params, batch).cost_analysis())


def _pow2(n: int) -> int:
  return 1 << max(int(n) - 1, 1).bit_length()


def _read_config(workdir: str, flag: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise JaxsegError(f"--{flag}={workdir}: no config.json there (is it the workdir of a "
                      "segmentation run?)")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def _restore(workdir: str, flag: str, build_state: Callable):
  """(state, step, identity) of the latest checkpoint; `build_state(num_classes)` makes the
  abstract train state to restore into."""
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), {}, async_save=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise JaxsegError(f"--{flag}={workdir}: no checkpoint in {ckpt.directory}")
    identity = ckpt.saved_identity(step)
    state = build_state(identity["num_classes"])
    ckpt.identity = {**identity, "params": param_shapes(state.params)}
    state = ckpt.restore_state(step, state)
  finally:
    ckpt.close()
  return state, step, identity


def load_run(workdir: str, flag: str = "workdir") -> Run | GraphRun:
  """The model of run `workdir` with its latest checkpoint; one-line errors name `--flag`."""
  config = _read_config(workdir, flag)
  if config.model.name == "superpixel_gnn":
    return _load_graph_run(workdir, flag, config)
  from jaxseg.train import segmentation  # pylint: disable=g-import-not-at-top
  made = {}

  def build_state(num_classes):
    dtype = segmentation.compute_dtype(config.model.dtype)
    made["model"] = create_model(config.model.name, num_classes=num_classes,
                                 backbone=config.model.get("backbone"), dtype=dtype,
                                 **segmentation.model_kwargs(config))
    return segmentation.create_train_state(config, made["model"], sharding.make_mesh(),
                                           (64, 64, 3), config.train.steps)[0]

  state, step, identity = _restore(workdir, flag, build_state)
  spec = identity.get("preprocessing", "imagenet")
  preprocess = make_normalize() if spec == "imagenet" else weights.make_preprocess(spec)
  return Run(config, made["model"], {"params": state.params, "batch_stats": state.batch_stats},
             preprocess, identity["num_classes"], step, _load_classes(workdir, config),
             os.path.abspath(workdir))


def _load_graph_run(workdir: str, flag: str, config) -> GraphRun:
  from jaxseg.data import superpixels as sp  # pylint: disable=g-import-not-at-top
  from jaxseg.train import graph  # pylint: disable=g-import-not-at-top
  cnn = None
  if config.hybrid.cnn_workdir:
    cnn = load_run(config.hybrid.cnn_workdir, f"{flag} (its config.hybrid.cnn_workdir)")
  made = {}

  def build_state(num_classes):
    made["model"] = graph.make_model(config, num_classes, graph.compute_dtype(config.model.dtype))
    # Any graph has the node and edge feature widths the parameters depend on.
    segments = np.repeat(np.arange(2, dtype=np.int32), 4)[None].repeat(4, 0)
    g = sp.region_graph(segments, np.full((4, 8, 3), 128, np.uint8), num_classes=num_classes)
    if cnn is not None:
      g.nodes = np.concatenate([g.nodes, np.zeros((2, num_classes), np.float32)], -1)
    example = sp.batch_graphs([g], max_nodes=4, max_edges=max(len(g.senders), 1))
    return graph.create_state(config, made["model"], example, sharding.make_mesh())[0]

  state, step, identity = _restore(workdir, flag, build_state)
  return GraphRun(config, made["model"], state.params, graph.superpixels_of(config),
                  identity["num_classes"], step, _load_classes(workdir, config), cnn,
                  os.path.abspath(workdir))
