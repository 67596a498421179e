"""The comparison table: several models trained under one budget, and their ensemble.

`run(config, workdir)` trains each model of `config.compare.models` into WORKDIR/NAME (a run
already trained to the budget is reused; an interrupted one resumes from its checkpoint),
measures it (parameters, GFLOPs per image, inference images/s, time per epoch, the train
step's peak memory), evaluates the ensemble of the members named in `config.ensemble`, and
writes WORKDIR/{compare.md, compare.json, compare.png, per_class_iou.png}.

Every model sees the same data: `config.data` and the shared `config.train` keys replace its
own; the rest of its experiment config (architecture, optimizer) stays its own.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import re
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm

from jaxseg import evaluate, runs, visualize
from jaxseg.data import from_config
from jaxseg.errors import JaxsegError
from jaxseg.train import graph, segmentation
from jaxseg.train.checkpoint import workdir_path

# Unset data.num_train_examples / train.steps take these. The synthetic table takes 25 minutes
# on a 2-core CPU (README); CamVid's preset trains on whole 360x480 frames, an accelerator's
# budget (the README's CPU command takes 64x64 crops).
PRESETS = {
    "synthetic": {"num_train_examples": 1000, "steps": 150},
    "camvid": {"num_train_examples": 0, "steps": 300},
}
_FALLBACK = {"num_train_examples": 0, "steps": 2000}
SHARED_TRAIN_KEYS = ("steps", "batch_size", "eval_batch_size", "seed", "checkpoint_every",
                     "log_every", "num_eval_examples", "num_prediction_images")
ENSEMBLE = "ensemble"


def parse_budget(value: str, epoch_images: int, batch_size: int) -> int:
  """'300' (steps) or '2epochs' / '2.5 epochs' (passes over the train split) -> steps."""
  text = str(value).strip().lower()
  match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(epochs?|ep)?", text)
  if not match:
    raise JaxsegError(f"--budget={value!r}: expected a number of steps (300) or epochs "
                      "(2epochs)")
  amount = float(match.group(1))
  steps = math.ceil(amount * epoch_images / batch_size) if match.group(2) else int(amount)
  if steps < 1 or (not match.group(2) and amount != int(amount)):
    raise JaxsegError(f"--budget={value!r} must be a positive whole number of steps, or epochs")
  return steps


def resolved(config) -> ml_collections.ConfigDict:
  """`config` with the dataset's preset in the unset keys."""
  config = copy.deepcopy(config)
  preset = PRESETS.get(config.data.name, _FALLBACK)
  if config.data.num_train_examples is None:
    config.data.num_train_examples = preset["num_train_examples"]
  if config.train.steps is None:
    config.train.steps = preset["steps"]
  if config.train.steps < 1:
    raise JaxsegError(f"--budget / --config.train.steps={config.train.steps} must be at "
                      "least 1")
  return config


def configure(config, *, models=None, budget: str | None = None) -> ml_collections.ConfigDict:
  """The config with --models and --budget applied and the dataset's preset filled in."""
  config = copy.deepcopy(config)
  if models:
    config.compare.models = ",".join(models)
  config = resolved(config)
  names = selected(config)
  if budget:  # epochs need the size of the (preset's) train split
    train, _ = from_config.make_sources(model_config(config, names[0]))
    config.train.steps = parse_budget(budget, len(train), config.train.batch_size)
  return config


def selected(config) -> list[str]:
  names = [n.strip() for n in config.compare.models.split(",") if n.strip()]
  unknown = [n for n in names if n not in config.models]
  if unknown or not names:
    raise JaxsegError(f"--models={config.compare.models!r}: "
                      f"{'unknown ' + unknown[0] if unknown else 'no model named'}; valid "
                      f"choices: {', '.join(config.models.keys())}")
  return names


def model_config(config, name: str) -> ml_collections.ConfigDict:
  """Model `name`'s experiment config with the shared data and train keys."""
  cfg = copy.deepcopy(config.models[name])
  for key in config.data.keys():
    if key in cfg.data:
      cfg.data[key] = copy.deepcopy(config.data[key])
  for key in SHARED_TRAIN_KEYS:
    if key in cfg.train:
      cfg.train[key] = config.train[key]
  return cfg


def is_graph(cfg) -> bool:
  return cfg.model.name == "superpixel_gnn"


def _same_config(cfg, workdir: str) -> bool:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return json.load(f) == json.loads(cfg.to_json())


def train(cfg, workdir: str) -> dict[str, Any]:
  """The run's summary: read back when it was trained to the budget with this config, else
  trained (resuming from its checkpoint, whose identity check refuses another model or data)."""
  path = os.path.join(workdir, "summary.json")
  if os.path.exists(path):
    with open(path) as f:
      summary = json.load(f)
    if summary["steps"] == cfg.train.steps and _same_config(cfg, workdir):
      return summary
    if summary["steps"] > cfg.train.steps:
      raise JaxsegError(f"{workdir} was trained for {summary['steps']} steps, more than the "
                        f"budget of {cfg.train.steps}; use another --workdir or --budget")
  loop = graph if is_graph(cfg) else segmentation
  return loop.train_and_evaluate(cfg, workdir)


def _cached(path: str, key: dict, compute) -> dict:
  """JSON at `path` if it was computed for `key`, else compute() written there."""
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    if stored.get("key") == key:
      return stored
  value = {**compute(), "key": key}
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)
  return value


def measure(model, image_shape, p) -> dict[str, Any]:
  """GFLOPs per image (XLA's count of a forward pass) and inference images/s."""
  flops = model.forward_flops(image_shape)
  return {"gflops_per_image": None if flops is None else flops / 1e9,
          "images_per_second": evaluate.throughput(model, image_shape,
                                                   batch_size=p.batch_size, repeats=p.repeats)}


def _row(name: str, summary: dict, measured: dict, epoch_images: int) -> dict[str, Any]:
  train_ips = summary.get("images_per_second") or None
  return {
      "name": name, "model": "/".join(filter(None, (summary["model"], summary.get("backbone")))),
      "pixel_accuracy": summary["pixel_accuracy"], "miou": summary["miou"],
      "mean_dice": summary["mean_dice"], "per_class_iou": summary["per_class_iou"],
      # Training images/s after the first (compiling) step; an epoch = the train split once.
      "epoch_seconds": epoch_images / train_ips if train_ips else None,
      "train_seconds": summary["train_seconds"], "steps": summary["steps"],
      "params": summary["num_params"], "gflops_per_image": measured["gflops_per_image"],
      "images_per_second": measured["images_per_second"],
      "peak_bytes": summary.get("train_step_peak_bytes"),
  }


def _members(config, names: list[str]) -> tuple[list[str], list[float] | None]:
  members = [m.strip() for m in config.ensemble.members.split(",") if m.strip()]
  if not members:
    members = [n for n in names if not is_graph(config.models[n])]
  missing = [m for m in members if m not in names]
  if missing:
    raise JaxsegError(f"--config.ensemble.members: {missing[0]} is not among the compared "
                      f"models ({', '.join(names)})")
  weights = None
  if config.ensemble.weights:
    try:
      weights = [float(w) for w in config.ensemble.weights.split(",")]
    except ValueError:
      raise JaxsegError(f"--config.ensemble.weights={config.ensemble.weights!r}: expected "
                        "comma-separated numbers") from None
  return members, weights


def run(config, workdir: str) -> dict[str, Any]:
  """Trains, measures and evaluates every row (resuming), then writes the table and charts."""
  workdir = workdir_path(workdir)
  os.makedirs(workdir, exist_ok=True)
  config = resolved(config)
  names = selected(config)
  members, weights = _members(config, names)
  first_cnn = model_config(config, next((n for n in names if not is_graph(config.models[n])),
                                         names[0]))
  train_source, val_source = from_config.make_sources(first_cnn)
  epoch_images = len(train_source)
  # The val image size the models are scored at (COCO's: the canvas every image is padded to).
  window, operations = from_config.eval_settings(first_cnn, val_source.ignore_index)
  example = val_source[0]
  for op in operations:
    example = op.map(example)
  image_shape = tuple(np.asarray(example["image"]).shape)
  budget = config.train.steps
  stages = len(names) + (1 if members else 0)
  bar = tqdm.tqdm(total=stages, desc="compare", unit="model", dynamic_ncols=True,
                  disable=jax.process_index() != 0)
  rows, loaded = [], {}
  try:
    for name in names:
      bar.set_postfix_str(f"{name}: training / measuring")
      cfg = model_config(config, name)
      directory = os.path.join(workdir, name)
      summary = train(cfg, directory)

      def compute(directory=directory):
        loaded[directory] = runs.load_run(directory)
        return measure(loaded[directory], image_shape, config.profile)

      measured = _cached(os.path.join(directory, "profile.json"),
                         {"steps": summary["steps"], "image_shape": list(image_shape),
                          "batch_size": config.profile.batch_size}, compute)
      rows.append(_row(name, summary, measured, epoch_images))
      bar.update()
    if members:
      bar.set_postfix_str(f"ensemble of {len(members)}")
      rows.append(_ensemble_row(config, workdir, members, weights, rows, loaded, val_source,
                                (window, operations), image_shape))
      bar.update()
  finally:  # before any error message, not at exit
    bar.close()
  result = {"dataset": config.data.name, "data_dir": config.data.data_dir,
            "budget_steps": budget, "global_batch_size": config.train.batch_size,
            "train_examples": epoch_images,
            "val_examples": min(len(val_source), config.train.num_eval_examples or len(val_source)),
            "eval_image_shape": list(image_shape), "class_names": list(val_source.class_names),
            "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
            "platform": jax.default_backend(), "jax": jax.__version__,
            "date": datetime.date.today().isoformat(), "rows": rows}
  write_outputs(workdir, result)
  return result


def _ensemble_row(config, workdir, members, weights, rows, loaded, val_source, eval_mode,
                  image_shape):
  """The ensemble's scores on the val split (cached in WORKDIR/ensemble/eval.json) and
  figures: its members' training time, parameters and FLOPs add up; memory is the largest
  member's (each trains alone)."""
  directory = os.path.join(workdir, ENSEMBLE)
  os.makedirs(directory, exist_ok=True)
  by_name = {r["name"]: r for r in rows}
  dirs = [os.path.join(workdir, m) for m in members]
  key = {"members": members, "weights": weights,
         "steps": [by_name[m]["steps"] for m in members],
         "num_eval_examples": config.train.num_eval_examples,
         "batch_size": config.profile.batch_size}

  def compute():
    model = evaluate.Ensemble([loaded.get(d) or runs.load_run(d) for d in dirs], weights)
    window, operations = eval_mode  # the members' shared data: the same val split and mode
    batch = config.train.eval_batch_size or config.train.batch_size
    result = evaluate.evaluate(model, val_source, batch_size=batch, window=window,
                               num_examples=config.train.num_eval_examples or None,
                               operations=operations, desc="ensemble eval")
    report = evaluate.write_report(
        directory, result, model.classes,
        title=f"ensemble of {', '.join(members)}: val mIoU {result.summary['miou']:.3f}")
    return {"summary": {k: report[k] for k in ("miou", "pixel_accuracy", "mean_dice")},
            "per_class_iou": result.summary["per_class_iou"],
            **measure(model, image_shape, config.profile)}

  cached = _cached(os.path.join(directory, "profile.json"), key, compute)
  parts = [by_name[m] for m in members]
  total = lambda k: (None if any(p[k] is None for p in parts) else sum(p[k] for p in parts))
  return {"name": ENSEMBLE, "model": " + ".join(members), **cached["summary"],
          "per_class_iou": cached["per_class_iou"],
          "epoch_seconds": total("epoch_seconds"), "train_seconds": total("train_seconds"),
          "steps": config.train.steps, "params": total("params"),
          "gflops_per_image": cached["gflops_per_image"],
          "images_per_second": cached["images_per_second"],
          "peak_bytes": max((p["peak_bytes"] or 0) for p in parts) or None,
          "weights": weights or [1.0] * len(members)}


def _fmt(value, kind: str) -> str:
  if value is None:
    return "-"
  if kind == "score":
    return f"{value:.3f}"
  if kind == "seconds":
    minutes, seconds = divmod(int(round(value)), 60)
    return f"{minutes}:{seconds:02d}" if minutes else f"{value:.1f} s"
  if kind == "params":
    return f"{value / 1e6:.1f} M" if value >= 1e5 else f"{value / 1e3:.1f} k"
  if kind == "gflops":
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"
  if kind == "rate":
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"
  if kind == "bytes":
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"
  raise ValueError(kind)


COLUMNS = (("pixel acc.", "pixel_accuracy", "score"), ("mIoU", "miou", "score"),
           ("mean Dice", "mean_dice", "score"), ("time / epoch", "epoch_seconds", "seconds"),
           ("params", "params", "params"), ("GFLOPs / image", "gflops_per_image", "gflops"),
           ("images/s", "images_per_second", "rate"), ("peak memory", "peak_bytes", "bytes"))


def table(result: dict) -> str:
  """compare.md: the main table and the per-class IoU table."""
  rows = result["rows"]
  h, w = result["eval_image_shape"][:2]
  lines = [
      f"# {result['dataset']}: {len([r for r in rows if r['name'] != ENSEMBLE])} models under "
      f"one budget",
      "",
      f"{result['budget_steps']} steps of batch {result['global_batch_size']} each "
      f"({result['budget_steps'] * result['global_batch_size']:,} training images from "
      f"{result['train_examples']} train examples), scored on {result['val_examples']} val "
      f"examples at {h}x{w}. {result['device']} ({result['platform']}), jax "
      f"{result['jax']}, {result['date']}.",
      "",
      "| model | " + " | ".join(c[0] for c in COLUMNS) + " |",
      "|---|" + "---|" * len(COLUMNS),
  ]
  for r in rows:
    label = f"**{r['name']}**" if r["name"] == ENSEMBLE else r["name"]
    if r["model"] != r["name"]:
      label += f" ({r['model']})"
    lines.append(f"| {label} | " +
                 " | ".join(_fmt(r[key], kind) for _, key, kind in COLUMNS) + " |")
  lines += [
      "",
      "time / epoch: one pass over the train split at the measured training speed (after the "
      "compiling step; for the GNN, its graphs already built). GFLOPs / image: XLA's count for "
      f"one {h}x{w} forward pass (the GNN's excludes SLIC). images/s: inference on batches of "
      "val-size images (the GNN's includes SLIC). peak memory: XLA's buffers of one train step "
      "per device. The ensemble's time, parameters and FLOPs are its members' sums; its "
      "memory the largest member's.",
      "",
      "## Per-class val IoU",
      "",
      "| model | " + " | ".join(result["class_names"]) + " |",
      "|---|" + "---|" * len(result["class_names"]),
  ]
  for r in rows:
    lines.append(f"| {r['name']} | " +
                 " | ".join(_fmt(v, "score") for v in r["per_class_iou"]) + " |")
  return "\n".join(lines) + "\n"


def write_outputs(workdir: str, result: dict) -> None:
  """compare.md, compare.json, compare.png (scores per model), per_class_iou.png."""
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, "compare.json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(workdir, "compare.md"), "w") as f:
    f.write(table(result))
  rows = result["rows"]
  names = [r["name"] for r in rows]
  title = f"{result['dataset']}, {result['budget_steps']} steps x {result['global_batch_size']}"
  visualize.grouped_bars(os.path.join(workdir, "compare.png"), names,
                         {"pixel accuracy": [r["pixel_accuracy"] for r in rows],
                          "mIoU": [r["miou"] for r in rows],
                          "mean Dice": [r["mean_dice"] for r in rows]},
                         ylabel="val score", title=title)
  visualize.grouped_bars(os.path.join(workdir, "per_class_iou.png"), result["class_names"],
                         {r["name"]: r["per_class_iou"] for r in rows}, ylabel="val IoU",
                         title=f"Per-class val IoU: {title}")
