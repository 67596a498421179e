"""The one bridge from an experiment's ConfigDict to the objects a training run is made of.

`validate(config)` checks every value it knows before anything is built or compiled, with one
line naming the key and its allowed range; the builders below it turn the sections into
plain constructor arguments (dtype, models, optimizer, loss, superpixel settings, loop
settings) and materialise train states with `eval_shape` then `jit(out_shardings=...)`.
Below this module, library code takes plain arguments; `jaxseg.data.from_config` is the same
bridge for the data section.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg import losses, weights
from jaxseg.data import graph_data, stats as data_stats, superpixels as sp
from jaxseg.errors import JaxsegError
from jaxseg.models import create_model, mask_gan, sagan
from jaxseg.models.superpixel_gnn import LAYERS, SuperpixelGNN
from jaxseg.train import ema as ema_lib
from jaxseg.train import gan as gan_lib
from jaxseg.train import optim, sharding
from jaxseg.train.evaluation import EVAL_KEYS
from jaxseg.train.checkpoint import param_shapes
from jaxseg.train.state import TrainState

DTYPES = ("auto", "float32", "bfloat16")

# --- validation --------------------------------------------------------------------------------

_INF = math.inf


@dataclasses.dataclass(frozen=True)
class Rule:
  """A numeric key's allowed range: low <= value <= high (or < with the open flags)."""
  low: float = -_INF
  high: float = _INF
  integer: bool = False
  low_open: bool = False
  high_open: bool = False
  optional: bool = False  # None allowed (a placeholder: the dataset's or model's default)

  def describe(self) -> str:
    kind = "a whole number" if self.integer else "a finite number"
    if self.low > -_INF and self.high < _INF:
      return (f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
              f"{')' if self.high_open else ']'}")
    if self.low > -_INF:
      return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
    if self.high < _INF:
      return f"{kind} {'<' if self.high_open else '<='} {self.high:g}"
    return kind

  def accepts(self, value) -> bool:
    if value is None:
      return self.optional
    if isinstance(value, (tuple, list)):  # e.g. one width per decoder level
      return bool(value) and all(self.accepts(v) for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return False
    if self.integer and (not float(value).is_integer()):
      return False
    if not math.isfinite(value):
      return False
    if value < self.low or (self.low_open and value == self.low):
      return False
    return not (value > self.high or (self.high_open and value == self.high))


COUNT = Rule(1, integer=True)  # at least one
NONNEG_INT = Rule(0, integer=True)  # zero allowed (0 usually means "off" or "all")
NONNEG = Rule(0)
POSITIVE = Rule(0, low_open=True)
FRACTION = Rule(0, 1, high_open=True)  # [0, 1)
ANY_INT = Rule(integer=True)

# Every numeric key of every experiment's config (tests/test_build.py checks that none is
# missing). Keys absent from a config are not checked.
RULES: dict[str, Rule] = {
    "data.image_size": COUNT,
    "data.seed": ANY_INT,
    "data.num_train_examples": NONNEG_INT,
    "data.extra_train_fraction": FRACTION,
    "data.worker_count": NONNEG_INT,
    "data.prefetch": COUNT,
    "data.options.min_labelled_area": Rule(0, integer=True, optional=True),
    "train.steps": COUNT,
    "train.batch_size": COUNT,
    "train.eval_batch_size": NONNEG_INT,
    "train.checkpoint_every": COUNT,
    "train.keep_checkpoints": COUNT,
    "train.log_every": COUNT,
    "train.eval_every": NONNEG_INT,
    "train.num_eval_examples": NONNEG_INT,
    "train.num_prediction_images": NONNEG_INT,
    "train.seed": ANY_INT,
    "train.max_nonfinite_steps": COUNT,
    "train.loss.ce": NONNEG,
    "train.loss.dice": NONNEG,
    "train.loss.focal": NONNEG,
    "train.loss.lovasz": NONNEG,
    "train.loss.tversky": NONNEG,
    "train.loss.ohem": NONNEG,
    "train.loss_options.tversky.alpha": NONNEG,
    "train.loss_options.tversky.beta": NONNEG,
    "train.loss_options.tversky.gamma": POSITIVE,
    "train.loss_options.ohem.thresh": Rule(0, 1),
    "train.loss_options.ohem.min_kept": NONNEG_INT,
    "data.in_channels": NONNEG_INT,
    "data.val_fraction": Rule(0, 1, low_open=True, high_open=True),
    "train.d_steps": COUNT,
    "train.ema_decay": FRACTION,
    "train.accumulate_steps": COUNT,
    "train.feature_matching": NONNEG,
    "train.l1": NONNEG,
    "train.sample_every": COUNT,
    "train.num_samples": COUNT,
    "optim.learning_rate": POSITIVE,
    "optim.g_learning_rate": POSITIVE,
    "optim.d_learning_rate": POSITIVE,
    "optim.warmup_steps": NONNEG_INT,
    "optim.power": POSITIVE,
    "optim.end_learning_rate_factor": Rule(0, 1),
    "optim.weight_decay": NONNEG,
    "optim.momentum": FRACTION,
    "optim.b1": FRACTION,
    "optim.b2": FRACTION,
    "optim.clip_norm": NONNEG,
    "optim.backbone_lr_multiplier": NONNEG,
    "optim.freeze_backbone_steps": NONNEG_INT,
    "model.aspp_features": COUNT,
    "model.decoder_features": Rule(1, integer=True, optional=True),  # one, or one per level
    "model.low_level_features": COUNT,
    "model.dropout_rate": FRACTION,
    "model.features": Rule(1, integer=True, optional=True),
    "model.depth": Rule(1, integer=True, optional=True),
    "model.hidden": COUNT,
    "model.num_layers": COUNT,
    "model.z_dim": COUNT,
    "model.g_ch": COUNT,
    "model.d_ch": COUNT,
    "model.attention_resolution": NONNEG_INT,
    "model.background_class": Rule(-1, integer=True, optional=True),
    "superpixels.n_segments": Rule(2, integer=True, optional=True),
    "superpixels.compactness": POSITIVE,
    "superpixels.sigma": NONNEG,
    "superpixels.scale": Rule(0, 1, low_open=True, optional=True),
    "superpixels.batch_size": COUNT,
    "eval.num_images": Rule(2, integer=True),
    "eval.kid_subsets": COUNT,
}
# Keys whose value is one of a few names.
CHOICES: dict[str, tuple[Any, ...]] = {
    "model.dtype": DTYPES,
    "optim.name": optim.OPTIMIZERS,
    "optim.schedule": optim.SCHEDULES,
    "model.layer": LAYERS,
    "model.kind": gan_lib.KINDS,
    "superpixels.method": graph_data.METHODS,
    "model.output_stride": (8, 16, 32),
}


def _flat(config, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    path = f"{prefix}{key}"
    if hasattr(value, "items"):
      out.update(_flat(value, path + "."))
    else:
      out[path] = value
  return out


def validate(config) -> None:
  """Raises one line naming the first config value outside its allowed range or choices."""
  flat = _flat(config)
  for key, rule in RULES.items():
    if key in flat and not rule.accepts(flat[key]):
      raise JaxsegError(f"--config.{key}={flat[key]!r} must be {rule.describe()}"
                        + (" (or None: the default)" if rule.optional else ""))
  for key, choices in CHOICES.items():
    if key in flat and flat[key] not in choices:
      raise JaxsegError(f"--config.{key}={flat[key]!r} is not one of: {', '.join(map(str, choices))}")
  loss = {k[len("train.loss."):]: v for k, v in flat.items() if k.startswith("train.loss.")}
  if loss and not any(loss.values()):
    raise JaxsegError(f"--config.train.loss: at least one of {', '.join(loss)} must be above 0")
  best = flat.get("train.keep_best")
  if best:
    names = [*EVAL_KEYS, *(f"ema/{k}" for k in EVAL_KEYS)]
    if best not in names:
      raise JaxsegError(f"--config.train.keep_best={best!r} is not one of: {', '.join(names)} "
                        f"(or \"\": off)")
    if best.startswith("ema/") and not flat.get("train.ema_decay"):
      raise JaxsegError(f"--config.train.keep_best={best!r} needs the weight average: set "
                        f"--config.train.ema_decay (e.g. 0.999) or keep_best={best[4:]!r}")
    if not flat.get("train.eval_every"):
      raise JaxsegError(f"--config.train.keep_best={best!r} needs evaluations to choose from: "
                        f"set --config.train.eval_every > 0 (it is {flat.get('train.eval_every')})")


# --- plain settings ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """What the shared training loop (jaxseg.train.loop) needs, as plain values."""
  steps: int
  batch_size: int
  log_every: int
  checkpoint_every: int
  keep_checkpoints: int
  eval_every: int = 0  # 0: at the end only
  sample_every: int = 0  # 0: no sample pictures (the GAN draws them)
  max_nonfinite_steps: int = 5
  seed: int = 0
  keep_best: str = ""  # a val score (EVAL_KEYS, or "ema/" + one): its best checkpoint is kept


def loop_settings(config) -> LoopSettings:
  t = config.train
  return LoopSettings(steps=t.steps, batch_size=t.batch_size, log_every=t.log_every,
                      checkpoint_every=t.checkpoint_every, keep_checkpoints=t.keep_checkpoints,
                      eval_every=t.get("eval_every", 0), sample_every=t.get("sample_every", 0),
                      max_nonfinite_steps=t.get("max_nonfinite_steps", 5), seed=t.seed,
                      keep_best=t.get("keep_best", ""))


def ema_decay(config) -> float:
  """train.ema_decay (0: no weight average); runs written before the key existed have none."""
  return float(config.train.get("ema_decay", 0.0))


def accumulate_steps(config, mesh) -> int:
  """train.accumulate_steps, checked against the batch: every micro-batch must be spread
  evenly over every device (jaxseg.train.steps.micro_batches)."""
  n = int(config.train.get("accumulate_steps", 1))
  devices = mesh.devices.size
  if config.train.batch_size % (n * devices):
    raise JaxsegError(
        f"--config.train.accumulate_steps={n}: train.batch_size={config.train.batch_size} must "
        f"be divisible by accumulate_steps x the {devices} devices ({n * devices}), so that "
        f"every micro-batch is spread evenly over the devices")
  return n


def compute_dtype(name: str):
  """'auto' is bfloat16 on GPU/TPU and float32 on CPU, where XLA's bf16 convs are slow."""
  if name not in DTYPES:
    raise JaxsegError(f"unknown --config.model.dtype={name!r}; valid choices: {', '.join(DTYPES)}")
  if name == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  return jnp.dtype(name)


def model_label(config) -> str:
  return "/".join(filter(None, (config.model.name, config.model.get("backbone"))))


# --- models ------------------------------------------------------------------------------------

_SEGMENTATION_OWN_KEYS = ("name", "backbone", "dtype", "pretrained", "init_from")
_GNN_KEYS = ("layer", "hidden", "num_layers", "dropout_rate")


def model_kwargs(config) -> dict[str, Any]:
  """The model section minus the keys the builder itself consumes."""
  kwargs = {k: v for k, v in config.model.to_dict().items() if k not in _SEGMENTATION_OWN_KEYS}
  return {k: (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()
          if v is not None}


def segmentation_model(config, num_classes: int, pretrained_meta: dict | None = None):
  """The CNN of config.model (a registered model, jaxseg.models.create_model)."""
  return create_model(config.model.name, num_classes=num_classes,
                      backbone=config.model.get("backbone"),
                      dtype=compute_dtype(config.model.dtype),
                      backbone_kwargs=pretrained_meta and pretrained_meta["backbone_kwargs"],
                      **model_kwargs(config))


def gnn_model(config, num_classes: int) -> SuperpixelGNN:
  unknown = sorted(set(config.model.keys()) - set(_GNN_KEYS) - {"name", "dtype"})
  if unknown:
    raise JaxsegError(f"--config.model.{unknown[0]} does not apply to model superpixel_gnn")
  return SuperpixelGNN(num_classes=num_classes, dtype=compute_dtype(config.model.dtype),
                       **{k: config.model[k] for k in _GNN_KEYS})


def gan(config, num_classes: int, image_shape) -> gan_lib.GAN:
  """The generator and discriminator of config.model for images of `image_shape`."""
  m = config.model
  dtype = compute_dtype(m.dtype)
  h, w = image_shape[:2]
  attention = m.attention_resolution or None
  if m.kind == "sagan":
    if h != w or h not in sagan.G_CHANNELS:
      raise JaxsegError(f"SAGAN generates square images of {sorted(sagan.G_CHANNELS)} pixels; "
                        f"the data gives {h}x{w} (set --config.data.crop_size or "
                        f"--config.data.image_size)")
    classes = num_classes if m.conditional else 0
    return gan_lib.GAN("sagan",
                       sagan.Generator(resolution=h, num_classes=classes, ch=m.g_ch,
                                       attention_resolution=attention, dtype=dtype),
                       sagan.Discriminator(resolution=h, num_classes=classes, ch=m.d_ch,
                                           attention_resolution=attention, dtype=dtype), m.z_dim)
  factor = 2 ** (len(m.g_channels) - 1)
  if h % factor or w % factor:
    raise JaxsegError(f"--config.model.g_channels has {len(m.g_channels)} blocks, so images "
                      f"must be multiples of {factor} on a side; the data gives {h}x{w}")
  return gan_lib.GAN(
      "mask",
      mask_gan.MaskToImageGenerator(num_classes, ch=m.g_ch, channels=tuple(m.g_channels),
                                    z_dim=m.z_dim, attention_resolution=attention, dtype=dtype),
      mask_gan.PatchDiscriminator(num_classes, ch=m.d_ch, attention_resolution=attention,
                                  dtype=dtype), m.z_dim)


# Per-dataset superpixel defaults (superpixels.n_segments / .scale left unset): about 12x12
# pixel superpixels on CamVid's 360x480 frames, SLIC at half resolution on Cityscapes' 2048.
SUPERPIXEL_DEFAULTS = {
    "synthetic": {"n_segments": 100, "scale": 1.0},
    "camvid": {"n_segments": 800, "scale": 1.0},
    "cityscapes": {"n_segments": 2000, "scale": 0.5},
}
_SUPERPIXEL_FALLBACK = {"n_segments": 800, "scale": 1.0}


def superpixels(config) -> graph_data.Superpixels:
  """config.superpixels with the dataset's defaults filled in."""
  defaults = SUPERPIXEL_DEFAULTS.get(config.data.name, _SUPERPIXEL_FALLBACK)
  s = config.superpixels
  return graph_data.Superpixels(
      method=s.method, compactness=s.compactness, sigma=s.sigma,
      n_segments=s.n_segments if s.n_segments is not None else defaults["n_segments"],
      scale=s.scale if s.scale is not None else defaults["scale"])


# --- optimizer and loss ------------------------------------------------------------------------


def optimizer(config, steps: int | None = None):
  """(schedule, optimizer) of the config.optim section (segmentation and GNN); the backbone
  keys are optional (the superpixel GNN's config has none)."""
  o = config.optim
  schedule = optim.make_schedule(o.schedule, o.learning_rate, steps or config.train.steps,
                                 warmup_steps=o.warmup_steps, power=o.power,
                                 end_factor=o.end_learning_rate_factor)
  tx = optim.make_optimizer(
      o.name, schedule, weight_decay=o.weight_decay, momentum=o.momentum,
      nesterov=o.nesterov, b1=o.b1, b2=o.b2, clip_norm=o.clip_norm,
      backbone_multiplier=o.get("backbone_lr_multiplier", 1.0),
      freeze_backbone_steps=o.get("freeze_backbone_steps", 0))
  return schedule, tx


def gan_optimizers(config):
  """SAGAN's two time-scale Adam pair (generator, discriminator) of config.optim."""
  o = config.optim
  return gan_lib.make_optimizers(o.g_learning_rate, o.d_learning_rate, o.b1, o.b2)


def class_weights(config, num_classes: int, statistics: Callable[[], dict] | None
                  ) -> list[float] | None:
  """train.class_weights as numbers: None when unset, median-frequency weights from the train
  split's statistics for "auto", else one number per class (a list or "1,5,2")."""
  value = config.train.get("class_weights", "")
  if value is None or (isinstance(value, str) and not value.strip()):
    return None
  if value == "auto":
    if statistics is None:
      raise JaxsegError("--config.train.class_weights=auto needs the train split's statistics")
    return data_stats.median_frequency_weights(statistics())
  try:
    numbers = [float(v) for v in (value.split(",") if isinstance(value, str) else value)]
  except (TypeError, ValueError):
    raise JaxsegError(f"--config.train.class_weights={value!r} must be \"auto\" or one number "
                      f"per class, e.g. \"{','.join(['1'] * num_classes)}\"") from None
  if len(numbers) != num_classes:
    raise JaxsegError(f"--config.train.class_weights has {len(numbers)} numbers for "
                      f"{num_classes} classes")
  if min(numbers) < 0 or not max(numbers) > 0 or not all(map(math.isfinite, numbers)):
    raise JaxsegError(f"--config.train.class_weights={value!r} must be finite, at least 0, and "
                      "not all 0")
  return numbers


def loss(config, ignore_index: int, class_weights: list[float] | None = None):
  options = config.train.get("loss_options")
  return losses.make_loss(dict(config.train.loss), ignore_index=ignore_index,
                          class_weights=class_weights,
                          options=options.to_dict() if options is not None else None)


# --- pretrained backbones ----------------------------------------------------------------------


def load_pretrained_backbone(config):
  """(variables, metadata) of --config.model.pretrained, or (None, None) when it is unset."""
  directory = config.model.get("pretrained") or ""
  if not directory:
    return None, None
  if not config.model.get("backbone"):
    raise JaxsegError(f"--config.model.pretrained={directory}: model {config.model.name} has "
                      "no backbone to load it into")
  variables, metadata = weights.load_pretrained(directory)
  if metadata["backbone"] != config.model.backbone:
    raise JaxsegError(
        f"--config.model.pretrained={directory} holds a {metadata['source']} {metadata['arch']} "
        f"backbone (jaxseg {metadata['backbone']}) but the model's backbone is "
        f"{config.model.backbone}; run with --backbone={metadata['backbone']}")
  return variables, metadata


def _natural(path: str):
  """Sort key in network order: stage3/block6 before stage3/block10."""
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def check_pretrained(abstract_state, variables, directory: str) -> None:
  """Every backbone path must match in presence and shape, or one line names the first (in
  network order) that does not: a silent partial load would train a half-random backbone."""
  for collection in ("params", "batch_stats"):
    mine = param_shapes({"backbone": getattr(abstract_state, collection).get("backbone", {})})
    theirs = param_shapes({"backbone": variables.get(collection, {})})
    for path in sorted(set(mine) | set(theirs), key=_natural):
      if path not in theirs:
        raise JaxsegError(f"--config.model.pretrained={directory}: {collection} {path} "
                          f"{tuple(mine[path])} of the model is missing from the checkpoint")
      if path not in mine:
        raise JaxsegError(f"--config.model.pretrained={directory}: the checkpoint's "
                          f"{collection} {path} {tuple(theirs[path])} is not in the model")
      if mine[path] != theirs[path]:
        raise JaxsegError(f"--config.model.pretrained={directory}: {collection} {path} has shape "
                          f"{tuple(theirs[path])} in the checkpoint but {tuple(mine[path])} in "
                          f"the model")


def insert_pretrained(state, variables, state_sharding):
  """`state` with the backbone's parameters and BatchNorm statistics taken from `variables`
  (already checked by `check_pretrained`)."""
  replaced = {c: {**getattr(state, c), "backbone": variables[c]}
              for c in ("params", "batch_stats")}
  if ema_lib.has_average(state):  # the average starts from the weights training starts from
    replaced["ema"] = ema_lib.init(replaced["params"], replaced["batch_stats"])
  return jax.device_put(state.replace(**replaced), state_sharding)


# --- train states ------------------------------------------------------------------------------


def abstract_state(init: Callable, seed: int, mesh):
  """(ShapeDtypeStructs of `init(key)`'s state, each with its replicated sharding): what a
  checkpoint restores into without compiling the initialisation."""
  shapes = jax.eval_shape(init, jax.random.key(seed))
  replicated = sharding.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                      shapes)


def materialize(init: Callable, seed: int, mesh, check: Callable | None = None):
  """(state, its sharding): `init(key)` traced once with eval_shape (`check(abstract)` may
  refuse it before anything compiles), then run by jit straight into its sharding."""
  rng = jax.random.key(seed)
  abstract = jax.eval_shape(init, rng)
  if check is not None:
    check(abstract)
  state_sharding = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
  return jax.jit(init, out_shardings=state_sharding)(rng), state_sharding


def _segmentation_state(model, tx, image_shape, with_ema, rng) -> TrainState:
  params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
  variables = model.init({"params": params_rng, "dropout": dropout_rng},
                         jnp.zeros((1, *image_shape), jnp.float32), train=False)
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables.get("batch_stats", {}), rng=state_rng,
                           with_ema=with_ema)


def segmentation_init(config, model, image_shape) -> Callable:
  """`init(key) -> TrainState` of a CNN for images of `image_shape` (H, W, C) with the
  config's optimizer: for `materialize` (training) or `abstract_state` (a finished run)."""
  _, tx = optimizer(config)
  return functools.partial(_segmentation_state, model, tx, image_shape, ema_decay(config) > 0)


def _gnn_state(model, tx, example, with_ema, rng) -> TrainState:
  params_rng, state_rng = jax.random.split(rng)
  params = model.init(params_rng, example, train=False)["params"]
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx, batch_stats={},
                           rng=state_rng, with_ema=with_ema)


def gnn_init(config, model, example) -> Callable:
  """`init(key) -> TrainState` of the superpixel GNN; `example` is one padded GraphsTuple,
  which fixes the node and edge feature widths (`example_graph`)."""
  _, tx = optimizer(config)
  return functools.partial(_gnn_state, model, tx, example, ema_decay(config) > 0)


def example_graph(num_classes: int, extra_features: int = 0):
  """A tiny padded GraphsTuple with the node and edge feature widths of real ones (plus
  `extra_features` per node: hybrid mode's CNN probabilities)."""
  segments = np.repeat(np.arange(2, dtype=np.int32), 4)[None].repeat(4, 0)
  g = sp.region_graph(segments, np.full((4, 8, 3), 128, np.uint8), num_classes=num_classes)
  if extra_features:
    g.nodes = np.concatenate([g.nodes, np.zeros((2, extra_features), np.float32)], -1)
  return sp.batch_graphs([g], max_nodes=4, max_edges=max(len(g.senders), 1))
