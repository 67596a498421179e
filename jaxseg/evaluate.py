"""Evaluating trained runs and ensembles of them on a dataset split (mmsegmentation's test).

    run = jaxseg.runs.load_run("runs/deeplab_resnet101_camvid")
    result = evaluate(run, source, tta=DEFAULT_TTA, window=(360, 480))
    write_report("runs/deeplab_resnet101_camvid", result, run.classes)

A model here is anything with `num_classes`, `classes` and `probabilities(images uint8
(B, H, W, 3), tta, window) -> float32 (B, H, W, K)`: a CNN run, a superpixel GNN run, or an
`Ensemble` of them. Scores come from one confusion matrix summed over the split
(`jaxseg.metrics`), so they equal the training loop's evaluation of the same model.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg import metrics, portable, visualize
from jaxseg.data import from_config, pipeline
from jaxseg.data.files import channels
from jaxseg.errors import JaxsegError
from jaxseg.inference import NO_TTA, TTA
from jaxseg.runs import load_run
from jaxseg.train import sharding
from jaxseg.train.evaluation import confusion_over
from jaxseg.train.workdir import Lock, ensure_writable, write_json


class Ensemble:
  """The weighted mean of several runs' class probabilities (different models or seeds).

  Weights are normalised to sum to one; every member must predict the same classes.
  """

  def __init__(self, members: Sequence[Any], weights: Sequence[float] | None = None):
    if not members:
      raise JaxsegError("an ensemble needs at least one run")
    weights = [1.0] * len(members) if weights is None else [float(w) for w in weights]
    if len(weights) != len(members):
      raise JaxsegError(f"--weights: {len(weights)} weights for {len(members)} runs")
    if min(weights) < 0 or sum(weights) <= 0:
      raise JaxsegError(f"--weights={','.join(map(str, weights))} must be non-negative with a "
                        "positive sum")
    first = members[0]
    for m in members[1:]:
      if m.classes.names != first.classes.names:
        raise JaxsegError(f"--workdir={m.workdir} predicts {len(m.classes.names)} classes "
                          f"({', '.join(m.classes.names[:4])}, ...) but --workdir="
                          f"{first.workdir} predicts {len(first.classes.names)} "
                          f"({', '.join(first.classes.names[:4])}, ...); an ensemble needs "
                          "the same classes")
    for m in members[1:]:
      if (m.in_channels, m.image_dtype) != (first.in_channels, first.image_dtype):
        raise JaxsegError(f"--workdir={m.workdir} takes {m.in_channels}-channel {m.image_dtype} "
                          f"images but --workdir={first.workdir} takes {first.in_channels}-"
                          f"channel {first.image_dtype} ones")
    self.members = list(members)
    self.weights = [w / sum(weights) for w in weights]
    self.num_classes, self.classes = first.num_classes, first.classes
    self.in_channels, self.image_dtype = first.in_channels, first.image_dtype
    self.workdir = ""

  @property
  def name(self) -> str:
    return "ensemble(" + ", ".join(m.name for m in self.members) + ")"

  def probabilities(self, images, tta: TTA = NO_TTA, window=None, sizes=None):
    total = 0.0
    padded = {} if sizes is None else {"sizes": sizes}  # a GraphRun member takes none
    for member, weight in zip(self.members, self.weights):
      if weight:
        total = total + weight * member.probabilities(images, tta=tta, window=window, **padded)
    return total

  def forward_flops(self, image_shape) -> float | None:
    flops = [m.forward_flops(image_shape) for m, w in zip(self.members, self.weights) if w]
    return None if any(f is None for f in flops) else float(sum(flops))


@dataclasses.dataclass
class Result:
  """Scores of a split (jaxseg.metrics.summarize keys), its confusion matrix, the settings, and
  a few (image, label, prediction) rows spread over the split."""
  summary: dict
  confusion: np.ndarray
  settings: dict
  kept: dict


def _confusion_fn(num_classes: int, ignore_index: int):
  @jax.jit
  def count(probabilities, labels, mask):
    predictions = jnp.argmax(probabilities, axis=-1)
    mask = jnp.broadcast_to(mask[:, None, None], labels.shape)
    cm = metrics.confusion_matrix(labels, predictions, num_classes, ignore_index, mask=mask)
    return cm, predictions.astype(jnp.uint8)
  return count


def evaluate(model, source, *, batch_size: int = 8, tta: TTA = NO_TTA,
             window: tuple[int, int] | None = None, num_examples: int | None = None,
             operations: Sequence = (), keep: int = 6, desc: str | None = "evaluate",
             mesh=None) -> Result:
  """Scores `model` on `source` (every example once, data parallel over `mesh`)."""
  if source.num_classes != model.num_classes or tuple(source.class_names) != model.classes.names:
    raise JaxsegError(f"{source!r} has classes ({', '.join(source.class_names[:4])}, ...; "
                      f"{source.num_classes}) but the model predicts "
                      f"({', '.join(model.classes.names[:4])}, ...; {model.num_classes})")
  mesh = mesh or sharding.make_mesh()
  n = mesh.devices.size
  if batch_size < 1 or batch_size % n:
    raise JaxsegError(f"--batch_size={batch_size} is not a positive multiple of the {n} "
                      f"devices of the mesh (e.g. {max(n, batch_size // n * n)})")
  count = _confusion_fn(model.num_classes, source.ignore_index)

  def eval_step(_, batch):
    probabilities = model.probabilities(batch["image"], tta=tta, window=window)
    return count(probabilities, batch["label"], batch["mask"])

  validate = pipeline.ValidateLabels(source.num_classes, source.ignore_index, repr(source))
  t = time.perf_counter()
  confusion, kept = confusion_over(eval_step, None, source, mesh, batch_size,
                                   model.num_classes, validate, num_examples, keep,
                                   operations, desc=desc)
  seconds = time.perf_counter() - t
  n = len(source) if num_examples is None else min(num_examples, len(source))
  settings = {"model": model.name, "tta": tta.describe(), "scales": list(tta.scales),
              "flip": tta.flip, "window": list(window) if window else None,
              "dataset": repr(source), "examples": n, "seconds": round(seconds, 2),
              "step": getattr(model, "step", None),
              "weights_source": getattr(model, "weights_source", None)}
  if isinstance(model, Ensemble):
    settings["members"] = [{"workdir": m.workdir, "model": m.name, "weight": w,
                            "step": m.step, "weights_source": m.weights_source}
                           for m, w in zip(model.members, model.weights)]
  return Result(metrics.summarize(confusion), confusion, settings, kept)


def write_report(out_dir: str, result: Result, classes, *, title: str | None = None,
                 bands=None) -> dict:
  """OUT/eval.json (scores, per-class table, settings, confusion matrix), confusion.png and
  eval_predictions.png (images that are not RGB shown by their `bands`, visualize.as_rgb);
  returns what eval.json holds."""
  os.makedirs(out_dir, exist_ok=True)
  s = result.summary
  report = {**{k: s[k] for k in ("miou", "pixel_accuracy", "mean_dice", "mean_accuracy",
                                 "mean_precision", "mean_recall", "num_pixels")},
            "per_class": {name: {"iou": s["per_class_iou"][k], "dice": s["per_class_dice"][k],
                                 "precision": s["precision"][k], "recall": s["recall"][k]}
                          for k, name in enumerate(classes.names)},
            **result.settings, "confusion": result.confusion.tolist()}
  if jax.process_index() != 0:
    return report
  write_json(os.path.join(out_dir, "eval.json"), report, indent=1)
  title = title or f"{result.settings['model']} (mIoU {metrics.fmt_score(s['miou'])})"
  visualize.confusion_heatmap(os.path.join(out_dir, "confusion.png"), result.confusion,
                              classes.names, title=title)
  if result.kept["image"]:
    visualize.prediction_grid(os.path.join(out_dir, "eval_predictions.png"),
                              np.stack(result.kept["image"]), np.stack(result.kept["label"]),
                              np.stack(result.kept["prediction"]), classes.names,
                              classes.palette, ignore_index=classes.ignore_index, title=title,
                              bands=bands)
  return report


def throughput(model, image_shape, *, batch_size: int = 8, repeats: int = 3,
               tta: TTA = NO_TTA, window=None) -> float:
  """Images per second of `model.probabilities` on batches of random images of `image_shape`
  (H, W, 3), after one untimed (compiling) batch; the median of `repeats` timed batches."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch_size, *image_shape), dtype=np.uint8)
  jax.block_until_ready(model.probabilities(images, tta=tta, window=window))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(model.probabilities(images, tta=tta, window=window))
    times.append(time.perf_counter() - t)
  return batch_size / float(np.median(times))


def load_model(workdirs: Sequence[str], weights: Sequence[float] | None = None,
               loading: dict | None = None):
  """One run, or the ensemble of several (equal weights unless given); `loading` is
  load_run's checkpoint/weights choice (default: the best checkpoint, the weight average).
  A `.safetensors` file in place of a workdir is a portable model file (load_pretrained)."""
  def load(path):
    if path.endswith(".safetensors") and not os.path.isdir(path):
      return portable.load_pretrained(path)
    return load_run(path, **(loading or {}))

  runs = [load(w) for w in workdirs]
  if len(runs) == 1 and weights is None:
    return runs[0]
  return Ensemble(runs, weights)


def eval_source(config, *, dataset: str | None = None, data_dir: str | None = None,
                split: str | None = None):
  """(source, sliding window, eval operations) of a run's config, with its dataset replaced
  by `dataset`/`data_dir` when given (that dataset's own reader options and defaults)."""
  config = config.copy_and_resolve_references()
  if dataset and dataset != config.data.name:
    config.data.name = dataset
    for key in config.data.options:
      config.data.options[key] = None
    for key in ("eval_window", "eval_size"):
      if key in config.data:
        config.data[key] = None
  if data_dir:
    config.data.data_dir = str(data_dir)
  source = from_config.make_source(config, split or config.data.val_split)
  window, operations = from_config.eval_settings(config, source.ignore_index)
  return source, window, operations


def parse_window(value: str | None, flag: str = "window") -> tuple[int, int] | None | str:
  """'HxW' -> (h, w); '0' or 'whole' -> None (whole images); '' or None -> 'default'."""
  if not value:
    return "default"
  if value in ("0", "whole"):
    return None
  try:
    h, w = (int(v) for v in value.lower().split("x"))
  except ValueError:
    raise JaxsegError(f"--{flag}={value!r}: expected HxW (e.g. 512x1024), or 0 for whole "
                      "images") from None
  if min(h, w) < 1:
    raise JaxsegError(f"--{flag}={value!r}: the window must be at least 1x1")
  return h, w


def run_evaluation(workdirs: Sequence[str], *, weights=None, out_dir: str | None = None,
                   dataset: str | None = None, data_dir: str | None = None,
                   split: str | None = None, tta: TTA = NO_TTA, window="default",
                   batch_size: int = 8, num_examples: int | None = None,
                   keep: int = 6, loading: dict | None = None) -> tuple[Result, dict]:
  """Evaluates one run or an ensemble on a split and writes OUT/eval.json and pictures (OUT
  defaults to the run's own workdir); returns the result and eval.json's content."""
  if not workdirs:
    raise JaxsegError("--workdir: give at least one run directory")
  if out_dir is None:
    if len(workdirs) > 1:
      raise JaxsegError("--out: an ensemble of several runs needs an output directory")
    out_dir = workdirs[0]
  flag = "out" if out_dir != workdirs[0] else "workdir"
  # Checked before anything is computed; held while the report is written, so that a
  # training run cannot write into the same directory meanwhile (nor this into its).
  lock = Lock(ensure_writable(out_dir, flag), "evaluation", flag).acquire()
  try:
    return _run_evaluation(workdirs, lock.path, weights=weights, dataset=dataset,
                           data_dir=data_dir, split=split, tta=tta, window=window,
                           batch_size=batch_size, num_examples=num_examples, keep=keep,
                           loading=loading)
  finally:
    lock.release()


def _run_evaluation(workdirs, out_dir, *, weights, dataset, data_dir, split, tta, window,
                    batch_size, num_examples, keep, loading) -> tuple[Result, dict]:
  model = load_model(workdirs, weights, loading)
  first = model.members[0] if isinstance(model, Ensemble) else model
  source, default_window, operations = eval_source(first.config, dataset=dataset,
                                                   data_dir=data_dir, split=split)
  window = default_window if window == "default" else window
  c, dtype = channels(source)
  if (c, dtype.name) != (model.in_channels, model.image_dtype):
    raise JaxsegError(f"{source!r} has {c}-channel {dtype.name} images but the model takes "
                      f"{model.in_channels}-channel {model.image_dtype} ones")
  result = evaluate(model, source, batch_size=batch_size, tta=tta, window=window,
                    num_examples=num_examples, operations=operations, keep=keep)
  where = f"{dataset or first.config.data.name} {split or first.config.data.val_split}"
  return result, write_report(
      out_dir, result, model.classes,
      title=f"{model.name}, {where}: mIoU {metrics.fmt_score(result.summary['miou'])}"
            f"{' (TTA)' if tta.num_views > 1 else ''}",
      bands=first.config.data.get("display_bands"))
