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
import functools
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxseg import inference
from jaxseg import weights as weights_lib
from jaxseg.data import dataset_spec, from_config, graph_data, superpixels as sp
from jaxseg.data.preprocess import make_normalize
from jaxseg.errors import JaxsegError
from jaxseg.inference import NO_TTA, TTA
from jaxseg.train import build, sharding, xla_stats
from jaxseg.train.checkpoint import Checkpointer, param_shapes, restore_latest_state
from jaxseg.train.workdir import Classes


def _load_classes(workdir: str, config) -> Classes:
  """classes.json, or (runs trained before it was written) the classes of the run's dataset."""
  return Classes.read(workdir) or Classes.of(
      from_config.make_source(config, config.data.val_split), config.data.name)


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
  weights_source: str = "raw"  # "ema": the run's weight average (load_run's `weights`)
  in_channels: int = 3  # of the images it takes (folder datasets: any)
  image_dtype: str = "uint8"  # ... and their dtype (folder datasets: uint16, float32 too)
  preprocessing: Any = "imagenet"  # what `preprocess` does: "imagenet", or {channels, mean, std}
  # Compile `probabilities` with the weights as constants (`frozen()`): on XLA:CPU 1.3x the
  # images/s of DeepLabV3+ ResNet-50 (benchmarks/RESULTS.md), for a compile per shape that
  # embeds them. Later changes to `variables` are then not seen.
  constant_weights: bool = False

  def __post_init__(self):
    model, preprocess, k = self.model, self.preprocess, self.num_classes

    def probabilities(variables, images, tta, window, sizes):
      apply = lambda x: model.apply(variables, x, train=False).astype(jnp.float32)
      x = preprocess(images)
      if sizes is not None:
        x = inference.zero_beyond(x, sizes)
      return inference.predict(apply, x, k, tta=tta, window=window)

    def logits(variables, images):
      return model.apply(variables, preprocess(images), train=False).astype(jnp.float32)

    # Compiled once per run (jit caches by the function object) and per static setting.
    if self.constant_weights:
      frozen = jax.device_get(self.variables)
      logits = functools.partial(logits, frozen)
      probabilities = functools.partial(probabilities, frozen)
    self._logits = jax.jit(logits)
    self._probabilities = jax.jit(probabilities, static_argnames=("tta", "window"))

  @property
  def name(self) -> str:
    return "/".join(filter(None, (self.config.model.name, self.config.model.get("backbone"))))

  def logits(self, images):
    return self._logits(*self._weights(), images)

  def probabilities(self, images, tta: TTA = NO_TTA, window: tuple[int, int] | None = None,
                    sizes=None):
    """float32 (B, H, W, K). `sizes` int (B, 2): each image's own (h, w) when the batch holds
    images of several sizes padded at the bottom and right; the padding is zero after
    normalisation (mmsegmentation's padding), whatever its pixel values."""
    return self._probabilities(*self._weights(), images, tta=tta,
                               window=None if window is None else tuple(window), sizes=sizes)

  def _weights(self) -> tuple:
    """The jitted functions' leading arguments: none when the weights are compiled in."""
    return () if self.constant_weights else (self.variables,)

  def frozen(self) -> "Run":
    """This run with its weights compiled in as constants (`constant_weights`): what batch
    prediction on a CPU uses."""
    return dataclasses.replace(self, constant_weights=True)

  def forward_flops(self, image_shape) -> float | None:
    """XLA's FLOP count of one forward pass on one image of `image_shape` (H, W, 3)."""
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.uint8)
    return xla_stats.flops(self._logits.lower(*self._weights(), x).cost_analysis())


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
  weights_source: str = "raw"
  in_channels: int = 3  # SLIC superpixels are of RGB images
  image_dtype: str = "uint8"

  def __post_init__(self):
    model = self.model
    self._apply = jax.jit(lambda params, graph: model.apply({"params": params}, graph,
                                                            train=False))

  @property
  def name(self) -> str:
    return "superpixel_gnn" + (f" (hybrid on {self.cnn.name})" if self.cnn else "")

  def _graphs(self, images: np.ndarray):
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


CHECKPOINTS = ("best", "latest")
WEIGHTS = ("ema", "raw")


def _restore(workdir: str, flag: str, build_state: Callable, config, checkpoint):
  """(state, step, identity) of the checkpoint asked for (see `load_run`), or the newest
  intact one; `build_state(identity)` (the saved identity: num_classes, in_channels...)
  gives the abstract train state (shapes, dtypes and shardings: nothing is computed or
  compiled) that it is restored into."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):  # (Orbax's manager would create it)
    raise JaxsegError(f"--{flag}={workdir}: no checkpoint in {os.path.abspath(directory)}")
  best = config.train.get("keep_best", "")
  ckpt = Checkpointer(directory, {}, async_save=False, best=f"eval/{best}" if best else "")
  try:
    if ckpt.latest_step() is None:
      raise JaxsegError(f"--{flag}={workdir}: no checkpoint in {ckpt.directory}")
    wanted = None
    if checkpoint == "best":
      wanted = ckpt.best_step()  # None without train.keep_best: the newest
    elif checkpoint != "latest":
      if not isinstance(checkpoint, int) or checkpoint not in ckpt.manager.all_steps():
        raise JaxsegError(f"--checkpoint={checkpoint}: {ckpt.directory} holds steps "
                          f"{sorted(ckpt.manager.all_steps())} (or say best or latest)")
      wanted = checkpoint

    def abstract(identity):  # of the step restored: a damaged newest one is passed over
      state = build_state(identity)
      ckpt.identity = {**identity, "params": param_shapes(state.params)}
      return state

    state, step = restore_latest_state(ckpt, abstract, wanted)
    identity = ckpt.saved_identity(step)
  finally:
    ckpt.close()
  return state, step, identity


def _variables(state, weights: str) -> tuple[dict, str]:
  """({"params", "batch_stats"}, which): the weight average when asked for and the run kept
  one (train.ema_decay), else the raw weights."""
  if weights not in WEIGHTS:
    raise JaxsegError(f"--weights_source={weights} is not one of: {', '.join(WEIGHTS)}")
  if weights == "ema" and state.ema is not None:
    return state.ema, "ema"
  return {"params": state.params, "batch_stats": state.batch_stats}, "raw"


def load_run(workdir: str, flag: str = "workdir", *, checkpoint: str | int = "best",
             weights: str = "ema") -> Run | GraphRun:
  """The model of run `workdir`; one-line errors name `--flag`.

  `checkpoint`: "best" (the default) is the checkpoint train.keep_best kept, or the newest
  when the run kept none; "latest" the newest intact one; a step number that one. `weights`:
  "ema" (the default) is the weight average when the run kept one (train.ema_decay), else
  the raw weights; "raw" the raw ones. The run's `step` and `weights_source` say what was loaded."""
  if checkpoint not in CHECKPOINTS and not isinstance(checkpoint, int):
    raise JaxsegError(f"--checkpoint={checkpoint} is not one of: best, latest, a step number")
  config = _read_config(workdir, flag)
  if config.model.name == "superpixel_gnn":
    return _load_graph_run(workdir, flag, config, checkpoint, weights)
  mesh = sharding.make_mesh()
  model = {}

  def build_state(identity):
    model["cnn"] = build.segmentation_model(config, identity["num_classes"])
    init = build.segmentation_init(config, model["cnn"],
                                   (64, 64, identity.get("in_channels", 3)))
    return build.abstract_state(init, config.train.seed, mesh)

  state, step, identity = _restore(workdir, flag, build_state, config, checkpoint)
  spec = identity.get("preprocessing", "imagenet")
  variables, which = _variables(state, weights)
  return Run(config, model["cnn"], variables, make_preprocess(spec), identity["num_classes"],
             step, _load_classes(workdir, config), os.path.abspath(workdir), which,
             identity.get("in_channels", 3), identity.get("image_dtype", "uint8"), spec)


def make_preprocess(spec) -> Callable:
  """The input function of a preprocessing spec a run saved: "imagenet" or {channels, mean,
  std} (a pretrained backbone's, or the data's own statistics)."""
  return make_normalize() if spec == "imagenet" else weights_lib.make_preprocess(spec)


def training_size(run) -> tuple[int, int] | None:
  """The (h, w) of the images `run` trained on, or None where unknown or meaningless."""
  if isinstance(run, GraphRun):
    return None  # whole images always: its superpixels span the image
  data = run.config.data
  pair = from_config._pair  # pylint: disable=protected-access
  crop = pair(data.get("crop_size"), "crop_size")
  if not crop:
    try:
      crop = dataset_spec(data.name).crop_size
    except JaxsegError:
      crop = None
  if not crop:
    # Folder datasets crop to the size of their first image: only the run's summary says it.
    try:
      with open(os.path.join(run.workdir, "summary.json"), encoding="utf-8") as f:
        size = json.load(f).get("image_size")
      crop = (int(size[0]), int(size[1])) if size else None
    except (OSError, ValueError, TypeError, IndexError, AttributeError):
      crop = None
  if not crop and data.name == "synthetic":  # generated at the training size, not cropped
    crop = pair(data.get("image_size"), "image_size")
  return tuple(crop) if crop else None


def _load_graph_run(workdir: str, flag: str, config, checkpoint, weights) -> GraphRun:
  cnn = None
  if config.hybrid.cnn_workdir:
    cnn = load_run(config.hybrid.cnn_workdir, f"{flag} (its config.hybrid.cnn_workdir)")
  mesh = sharding.make_mesh()
  model = {}

  def build_state(identity):
    num_classes = identity["num_classes"]
    model["gnn"] = build.gnn_model(config, num_classes)
    example = build.example_graph(num_classes, num_classes if cnn is not None else 0)
    return build.abstract_state(build.gnn_init(config, model["gnn"], example),
                                config.train.seed, mesh)

  state, step, identity = _restore(workdir, flag, build_state, config, checkpoint)
  variables, which = _variables(state, weights)
  return GraphRun(config, model["gnn"], variables["params"], build.superpixels(config),
                  identity["num_classes"], step, _load_classes(workdir, config), cnn,
                  os.path.abspath(workdir), which)
