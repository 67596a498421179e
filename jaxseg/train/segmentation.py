"""The segmentation training loop: `train_and_evaluate(config, workdir)`.

This is the one place where an experiment's ConfigDict becomes constructor arguments for the
dataset, model, loss and optimizer; everything it calls takes plain arguments.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxseg import losses, metrics, visualize, weights
from jaxseg.data import pipeline
from jaxseg.data.from_config import make_data
from jaxseg.data.preprocess import make_normalize
from jaxseg.errors import JaxsegError
from jaxseg.evaluate import confusion_over
from jaxseg.models import create_model
from jaxseg.train import distributed, optim, runs, sharding, xla_stats
from jaxseg.train.checkpoint import Checkpointer, param_shapes, resume, tree_signature, workdir_path
from jaxseg.train.logging import MetricWriter, Progress
from jaxseg.train.state import TrainState
from jaxseg.train.steps import make_eval_step, make_train_step

DTYPES = ("auto", "float32", "bfloat16")


def compute_dtype(name: str):
  """'auto' is bfloat16 on GPU/TPU and float32 on CPU, where XLA's bf16 convs are slow."""
  if name not in DTYPES:
    raise JaxsegError(f"unknown --config.model.dtype={name!r}; valid choices: {', '.join(DTYPES)}")
  if name == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  return jnp.dtype(name)


def model_kwargs(config) -> dict[str, Any]:
  """The model section minus the keys the loop itself consumes."""
  kwargs = config.model.to_dict()
  for key in ("name", "backbone", "dtype", "pretrained"):
    kwargs.pop(key, None)
  return {k: (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()
          if v is not None}


def optimizer_from_config(config, steps: int):
  """(schedule, optimizer) of the config.optim section; the backbone keys are optional (the
  superpixel GNN's config has no backbone)."""
  o = config.optim
  schedule = optim.make_schedule(o.schedule, o.learning_rate, steps,
                                 warmup_steps=o.warmup_steps, power=o.power,
                                 end_factor=o.end_learning_rate_factor)
  tx = optim.make_optimizer(
      o.name, schedule, weight_decay=o.weight_decay, momentum=o.momentum,
      nesterov=o.nesterov, b1=o.b1, b2=o.b2, clip_norm=o.clip_norm,
      backbone_multiplier=o.get("backbone_lr_multiplier", 1.0),
      freeze_backbone_steps=o.get("freeze_backbone_steps", 0))
  return schedule, tx


def create_train_state(config, model, mesh, image_shape, steps: int, pretrained=None):
  """State built with eval_shape, then materialised by jit straight into its sharding.

  `pretrained` backbone variables are checked against the abstract state first, so that a
  mismatch stops the run before anything is compiled.
  """
  schedule, tx = optimizer_from_config(config, steps)

  def init(rng):
    params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
    variables = model.init({"params": params_rng, "dropout": dropout_rng},
                           jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables.get("batch_stats", {}), rng=state_rng)

  rng = jax.random.key(config.train.seed)
  abstract = jax.eval_shape(init, rng)
  if pretrained is not None:
    check_pretrained(abstract, pretrained, config.model.pretrained)
  if "backbone" not in abstract.params and (config.optim.backbone_lr_multiplier != 1.0 or
                                            config.optim.freeze_backbone_steps):
    raise JaxsegError(f"optim.backbone_lr_multiplier / optim.freeze_backbone_steps: model "
                      f"{config.model.name} has no backbone")
  state_sharding = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
  state = jax.jit(init, out_shardings=state_sharding)(rng)
  return state, state_sharding, schedule


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
  return jax.device_put(state.replace(**replaced), state_sharding)


def attention_figure(path: str, state, images, preprocess, title: str) -> str:
  """Runs the model on `images` collecting its sown attention maps; writes them as a grid."""

  @jax.jit
  def maps(params, batch_stats, images):
    _, sown = state.apply_fn({"params": params, "batch_stats": batch_stats}, preprocess(images),
                             train=False, mutable=["intermediates"])
    return {name: value["attention"][0] for name, value in sown["intermediates"].items()}

  attention = jax.device_get(maps(state.params, state.batch_stats, images))
  return visualize.attention_grid(path, images, dict(sorted(attention.items())), title=title)


def jit_steps(config, mesh, state_sharding, schedule, num_classes, ignore_index,
              preprocess=None, eval_window=None):
  """The train and eval steps, compiled once for the mesh; the train state is donated.

  `preprocess` maps uint8 images to model inputs (default: ImageNet mean/std, RGB);
  `eval_window` (h, w) makes evaluation slide a window over larger images.
  """
  preprocess = preprocess or make_normalize()
  loss_fn = losses.make_loss(dict(config.train.loss), ignore_index=ignore_index)
  batch_sharding = sharding.batch_sharding(mesh)
  train_step = jax.jit(make_train_step(loss_fn, preprocess, schedule,
                                       config.optim.freeze_backbone_steps),
                       in_shardings=(state_sharding, batch_sharding),
                       out_shardings=(state_sharding, sharding.replicated(mesh)),
                       donate_argnums=0)
  eval_step = jax.jit(make_eval_step(preprocess, num_classes, ignore_index, eval_window),
                      in_shardings=(state_sharding, batch_sharding),
                      out_shardings=(sharding.replicated(mesh), batch_sharding))
  return train_step, eval_step


def step_figures(step_stats, earlier) -> dict:
  """The train step's FLOPs and peak memory per device (XLA's figures, jaxseg.train.xla_stats)
  from this run's compilation or, if it compiled none, the ones saved with the checkpoint."""
  if step_stats is None:
    return {k: earlier.get(k) for k in ("train_step_flops", "train_step_peak_bytes")}
  return {"train_step_flops": step_stats["flops"],
          "train_step_peak_bytes": step_stats["peak_bytes"]}


def save_config(config, workdir: str) -> None:
  """WORKDIR/config.json: what `jaxseg.train.runs.load_run` rebuilds the model from."""
  if jax.process_index() == 0:
    tmp = os.path.join(workdir, "config.json.tmp")
    with open(tmp, "w") as f:
      f.write(config.to_json(indent=2))
    os.replace(tmp, os.path.join(workdir, "config.json"))


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds a checkpoint), evaluates, writes outputs."""
  workdir = workdir_path(workdir)
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh()
  local_batch = sharding.check_batch_size(config.train.batch_size, mesh)
  eval_batch = config.train.eval_batch_size or config.train.batch_size
  sharding.check_batch_size(eval_batch, mesh, "train.eval_batch_size")
  dtype = compute_dtype(config.model.dtype)
  steps = config.train.steps
  for key in ("steps", "checkpoint_every", "log_every", "keep_checkpoints"):
    if config.train[key] < 1:
      raise JaxsegError(f"--config.train.{key}={config.train[key]} must be at least 1")

  data = make_data(config, workdir, local_batch)
  train_source, val_source = data.train, data.val
  num_classes, ignore = train_source.num_classes, train_source.ignore_index
  validate = pipeline.ValidateLabels(num_classes, ignore, repr(train_source))

  pretrained, pretrained_meta = load_pretrained_backbone(config)
  model = create_model(config.model.name, num_classes=num_classes,
                       backbone=config.model.backbone, dtype=dtype,
                       backbone_kwargs=pretrained_meta and pretrained_meta["backbone_kwargs"],
                       **model_kwargs(config))
  image_shape = data.image_shape
  state, state_sharding, schedule = create_train_state(config, model, mesh, image_shape, steps,
                                                       pretrained)
  num_params = int(sum(x.size for x in jax.tree.leaves(state.params)))

  identity = {"model": config.model.name, "backbone": config.model.backbone,
              "num_classes": num_classes, "params": param_shapes(state.params),
              "opt_state": tree_signature(state.opt_state), "train_data": repr(train_source),
              "global_batch_size": config.train.batch_size,
              "preprocessing": pretrained_meta["preprocessing"] if pretrained_meta else "imagenet"}
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), identity,
                      keep=config.train.keep_checkpoints, sampler=data.loader.global_sampler)
  data_iter = pipeline.Prefetch(iter(data.loader), lambda b: sharding.put_batch(b, mesh),
                               size=config.data.prefetch)
  resumed = ckpt.latest_step() is not None
  state, earlier, start = resume(ckpt, state, data_iter)
  # Only once the workdir's checkpoint (if any) is known to be this run's: a refused run
  # leaves the config that its checkpoint belongs to.
  save_config(config, workdir)
  runs.save_classes(workdir, data.train, config.data.name)
  if not resumed and pretrained is not None:
    state = insert_pretrained(state, pretrained, state_sharding)
    logging.info("Backbone from %s: %s %s weights (%s preprocessing)", config.model.pretrained,
                 pretrained_meta["source"], pretrained_meta["arch"],
                 pretrained_meta["preprocessing_name"])

  preprocess = (weights.make_preprocess(pretrained_meta["preprocessing"]) if pretrained_meta
                else make_normalize())
  train_step, eval_step = jit_steps(config, mesh, state_sharding, schedule, num_classes, ignore,
                                    preprocess, data.eval_window)

  writer = MetricWriter(workdir, resume_step=start)
  model_label = "/".join(filter(None, (config.model.name, config.model.get("backbone"))))
  logging.info("%s, %d classes, %s params, dtype %s, %d devices, global batch %d",
               model_label, num_classes, f"{num_params:,}",
               jnp.dtype(dtype).name, mesh.devices.size, config.train.batch_size)

  def is_eval_step(step):
    return step == steps or (config.train.eval_every and step % config.train.eval_every == 0)

  train_rows = {}  # the train scalars of eval steps, written together with the eval scalars

  eval_seconds = 0.0

  def run_eval(step):
    nonlocal eval_seconds
    t = time.perf_counter()
    confusion, kept = confusion_over(eval_step, state, val_source, mesh, eval_batch,
                                     num_classes, validate,
                                     config.train.num_eval_examples or None,
                                     keep=config.train.num_prediction_images,
                                     operations=data.eval_operations, skip_log=data.skip_log)
    summary = metrics.summarize(confusion)
    eval_seconds += time.perf_counter() - t
    writer.write(step, {**train_rows.pop(step, {}),
                        **{f"eval/{k}": summary[k] for k in
                           ("miou", "pixel_accuracy", "mean_dice", "mean_accuracy")}})
    return summary, kept

  def progress_record(step):
    """Run bookkeeping saved with each checkpoint, so that a resumed run reports totals."""
    elapsed = time.perf_counter() - t_start - eval_seconds
    record = {"train_seconds": earlier.get("train_seconds", 0.0) + elapsed,
              "images_per_second": earlier.get("images_per_second", 0.0),
              **step_figures(step_stats, earlier)}
    if step - start > 1 and compile_seconds is not None:
      record["images_per_second"] = (step - start - 1) * config.train.batch_size / max(
          elapsed - compile_seconds, 1e-9)
    return record

  progress = Progress(steps, start, config.train.batch_size)
  t_start, compile_seconds, pending, step_stats = time.perf_counter(), None, None, None

  def drain(step, out):
    """Host-side bookkeeping of a finished step (one step behind: no device sync stall)."""
    nonlocal compile_seconds
    out = jax.device_get(out)
    if compile_seconds is None:
      compile_seconds = time.perf_counter() - t_start
    row = {k: v for k, v in out.items() if k not in ("finite", "nonfinite_streak")}
    if not out["finite"]:
      progress.write(f"step {step}: non-finite loss or gradient ({out['loss']}); update skipped "
                     f"({int(out['nonfinite_streak'])} in a row)")
      row["nonfinite_step"] = 1
      if not is_eval_step(step):
        writer.write(step, row)  # always logged, with its step number
      if out["nonfinite_streak"] >= config.train.max_nonfinite_steps:
        raise FloatingPointError(
            f"training stopped at step {step}: {int(out['nonfinite_streak'])} consecutive steps "
            f"with a non-finite loss or gradient (limit train.max_nonfinite_steps="
            f"{config.train.max_nonfinite_steps}); lower optim.learning_rate or check the data")
    progress.update(step, float(out["loss"]), float(out["learning_rate"]))
    if is_eval_step(step):
      train_rows[step] = row
    elif step % config.train.log_every == 0 and out["finite"]:
      writer.write(step, row)

  # SIGTERM is caught until the checkpoint is written: the loop saves at the next step and
  # stops (distributed.Preemption), and a second notice cannot cut the save short.
  with distributed.Preemption() as preemption:
    try:
      for step in range(start + 1, steps + 1):
        batch = next(data_iter)
        if step_stats is None:  # compiled here once, for its FLOPs and memory as well
          train_step, step_stats = xla_stats.compile_with_stats(train_step, state, batch)
        state, out = train_step(state, batch)
        if pending is not None:
          drain(*pending)
        pending = (step, out)
        stop = preemption.reached(step)
        if step % config.train.checkpoint_every == 0 or step == steps or stop:
          drain(*pending)
          pending = None
          ckpt.save(step, state, data_iter, force=step == steps or stop,
                    progress=progress_record(step))
        if stop:
          if step in train_rows:  # its evaluation is skipped: stop as soon as possible
            writer.write(step, train_rows.pop(step))
          progress.close()
          raise distributed.Preempted(step, workdir)
        if is_eval_step(step) and step != steps:
          if pending is not None:
            drain(*pending)
            pending = None
          summary, _ = run_eval(step)
          progress.write(f"step {step}: val mIoU {metrics.fmt_score(summary['miou'])}")
      if pending is not None:
        drain(*pending)
      progress.close()
      final_step = int(jax.device_get(state.step))
      # The loop saved the last step already (or, resumed at the end, had nothing to train).
      totals = progress_record(final_step)
      summary, kept = run_eval(final_step)
    finally:
      data_iter.close()
      ckpt.wait()
      ckpt.close()
      writer.close()

  trained = max(steps - start, 0)
  result = {
      "miou": summary["miou"], "pixel_accuracy": summary["pixel_accuracy"],
      "mean_dice": summary["mean_dice"], "mean_accuracy": summary["mean_accuracy"],
      "per_class_iou": summary["per_class_iou"], "per_class_dice": summary["per_class_dice"],
      "precision": summary["precision"], "recall": summary["recall"],
      "class_names": list(train_source.class_names),
      "steps": final_step, "steps_this_run": trained, "resumed_from": start,
      # Wall time of the training loops of every run that built this checkpoint (compile
      # included, evaluation excluded).
      "train_seconds": round(totals["train_seconds"], 2),
      "compile_seconds": round(compile_seconds or 0.0, 2),
      # After the first (compiling) step of this run; a run that only re-evaluates keeps the
      # figure of the run that trained.
      "images_per_second": round(totals["images_per_second"], 3),
      "model": config.model.name, "backbone": config.model.backbone,
      "pretrained": (f"{pretrained_meta['source']}:{pretrained_meta['arch']}"
                     if pretrained_meta else None),
      "dataset": config.data.name, "image_size": list(image_shape[:2]),  # training crops
      "eval_window": list(data.eval_window) if data.eval_window else None,  # None: whole images
      "num_params": num_params, "dtype": jnp.dtype(dtype).name,
      "devices": mesh.devices.size, "platform": jax.default_backend(),
      "global_batch_size": config.train.batch_size,
      **step_figures(step_stats, earlier),
      "nonfinite_steps": int(jax.device_get(state.nonfinite_total)),
      # Bad examples left out (data.skip_bad_examples): found while listing the dataset, and
      # met while reading it (listed in skipped_examples.jsonl).
      "skipped_examples": (len(getattr(train_source, "skipped", ())) +
                           len(getattr(val_source, "skipped", ())) +
                           pipeline.count_logged(data.skip_log)),
      "eval_examples": min(len(val_source), config.train.num_eval_examples or len(val_source)),
  }
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(result, f, indent=2)
    if kept["image"]:
      visualize.prediction_grid(
          os.path.join(workdir, "predictions.png"), np.stack(kept["image"]),
          np.stack(kept["label"]), np.stack(kept["prediction"]),
          train_source.class_names, train_source.palette, ignore_index=ignore,
          title=f"{model_label} on {config.data.name} "
                f"(val mIoU {metrics.fmt_score(summary['miou'])})")
    if kept["image"] and getattr(model, "attention", False):
      attention_figure(os.path.join(workdir, "attention.png"), state, np.stack(kept["image"]),
                       preprocess, f"{config.model.name} attention gates on {config.data.name}")
    logging.info("Per-class results:\n%s",
                 metrics.class_table(summary, train_source.class_names))
  return result

