"""The segmentation task: `train_and_evaluate(config, workdir)`.

The config becomes objects in jaxseg.train.build (and jaxseg.data.from_config for the data);
the workdir, resume, cadence, non-finite policy, timing and summary are the shared skeleton's
(jaxseg.train.loop). What is left here is the task's own work: the CNN's state and steps, its
evaluation on the val split, and its pictures.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxseg import metrics, visualize, weights
from jaxseg.data import channels, pipeline
from jaxseg.data.from_config import make_data
from jaxseg.data.preprocess import make_normalize
from jaxseg.errors import JaxsegError
from jaxseg.train import build, loop, model_file, sharding
from jaxseg.train.checkpoint import param_shapes, tree_signature
from jaxseg.train.evaluation import EVAL_KEYS, confusion_over
from jaxseg.train.steps import make_eval_step, make_train_step
from jaxseg.train.workdir import save_classes

def create_train_state(config, model, mesh, image_shape, pretrained=None):
  """(state, its sharding): built with eval_shape, then materialised by jit into its sharding.

  `pretrained` backbone variables are checked against the abstract state first, so that a
  mismatch stops the run before anything is compiled.
  """

  def check(abstract):
    if pretrained is not None:
      # RGB filters for another channel count (smp's rule); in place, so that the caller
      # inserts the adapted ones.
      mine = param_shapes({"backbone": abstract.params.get("backbone", {})})
      params, adapted = weights.adapt_input_channels({"backbone": pretrained["params"]}, mine)
      if adapted:
        pretrained["params"] = params["backbone"]
        logging.info("Pretrained RGB filters adapted to %d input channels: %s",
                     image_shape[-1], ", ".join(adapted))
      build.check_pretrained(abstract, pretrained, config.model.pretrained)
    if "backbone" not in abstract.params and (config.optim.backbone_lr_multiplier != 1.0 or
                                              config.optim.freeze_backbone_steps):
      raise JaxsegError(f"optim.backbone_lr_multiplier / optim.freeze_backbone_steps: model "
                        f"{config.model.name} has no backbone")

  return build.materialize(build.segmentation_init(config, model, image_shape),
                           config.train.seed, mesh, check)


def attention_figure(path: str, state, images, preprocess, title: str, display=None) -> str:
  """Runs the model on `images` collecting its sown attention maps; writes them as a grid
  over `display` (RGB pictures of the images; default the images themselves)."""

  @jax.jit
  def maps(params, batch_stats, images):
    _, sown = state.apply_fn({"params": params, "batch_stats": batch_stats}, preprocess(images),
                             train=False, mutable=["intermediates"])
    return {name: value["attention"][0] for name, value in sown["intermediates"].items()}

  attention = jax.device_get(maps(state.params, state.batch_stats, images))
  return visualize.attention_grid(path, images if display is None else display,
                                  dict(sorted(attention.items())), title=title)


def jit_steps(config, mesh, state_sharding, num_classes, ignore_index, preprocess=None,
              eval_window=None, class_weights=None):
  """The train and eval steps, compiled once for the mesh; the train state is donated.

  `preprocess` maps uint8 images to model inputs (default: ImageNet mean/std, RGB);
  `eval_window` (h, w) makes evaluation slide a window over larger images.
  """
  preprocess = preprocess or make_normalize()
  schedule, _ = build.optimizer(config)
  loss_fn = build.loss(config, ignore_index, class_weights)
  batch_sharding = sharding.batch_sharding(mesh)
  train_step = jax.jit(make_train_step(loss_fn, preprocess, schedule,
                                       config.optim.freeze_backbone_steps,
                                       accumulate_steps=build.accumulate_steps(config, mesh),
                                       ema_decay=build.ema_decay(config)),
                       in_shardings=(state_sharding, batch_sharding),
                       out_shardings=(state_sharding, sharding.replicated(mesh)),
                       donate_argnums=0)
  eval_step = jax.jit(make_eval_step(preprocess, num_classes, ignore_index, eval_window),
                      in_shardings=(state_sharding, batch_sharding),
                      out_shardings=(sharding.replicated(mesh), batch_sharding))
  return train_step, eval_step


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds a checkpoint), evaluates, writes outputs."""
  build.validate(config)
  with loop.Run(workdir, config, build.loop_settings(config),
                purpose="segmentation training") as run:
    mesh = sharding.make_mesh()
    local_batch = sharding.check_batch_size(config.train.batch_size, mesh)
    eval_batch = config.train.eval_batch_size or config.train.batch_size
    sharding.check_batch_size(eval_batch, mesh, "train.eval_batch_size")
    build.accumulate_steps(config, mesh)  # checked before anything is read or compiled
    dtype = build.compute_dtype(config.model.dtype)
    num_eval = config.train.num_eval_examples or None

    data = make_data(config, run.workdir, local_batch)
    train_source, val_source = data.train, data.val
    num_classes, ignore = train_source.num_classes, train_source.ignore_index
    validate = pipeline.ValidateLabels(num_classes, ignore, repr(train_source))
    # The val split is read only at evaluation time: a bad file there must stop the run now.
    pipeline.check_examples(val_source, pipeline.ValidateLabels(num_classes, ignore,
                                                                repr(val_source)),
                            num_eval, jax.process_index(), jax.process_count(),
                            desc="checking val")

    if config.model.get("init_from"):
      if config.model.pretrained:
        raise JaxsegError("--config.model.init_from and --config.model.pretrained both set: a "
                          "model file holds the whole network, backbone included; set one")
      model_file.read_metadata(config.model.init_from)  # a bad file stops the run now
    pretrained, pretrained_meta = build.load_pretrained_backbone(config)
    weights_per_class = build.class_weights(config, num_classes, data.statistics)
    if weights_per_class is not None:
      logging.info("Class weights (train.class_weights=%s): %s", config.train.class_weights,
                   ", ".join(f"{n} {w:.3g}" for n, w in zip(train_source.class_names,
                                                            weights_per_class)))
    # What the model's input is: the data's own statistics (not 8-bit RGB, or asked for),
    # else a pretrained backbone's preprocessing or ImageNet's.
    preprocessing = data.normalization or (pretrained_meta["preprocessing"] if pretrained_meta
                                           else "imagenet")
    model = build.segmentation_model(config, num_classes, pretrained_meta)
    state, state_sharding = create_train_state(config, model, mesh, data.image_shape,
                                               pretrained)
    num_params = int(sum(x.size for x in jax.tree.leaves(state.params)))
    identity = {"model": config.model.name, "backbone": config.model.backbone,
                "num_classes": num_classes, "params": param_shapes(state.params),
                "opt_state": tree_signature(state.opt_state), "train_data": repr(train_source),
                "global_batch_size": config.train.batch_size,
                "preprocessing": preprocessing}
    in_channels, image_dtype = channels(train_source)
    if (in_channels, image_dtype) != (3, np.uint8):  # (absent for 8-bit RGB: earlier runs')
      identity.update(in_channels=in_channels, image_dtype=image_dtype.name)
    data_iter = pipeline.Prefetch(iter(data.loader), lambda b: sharding.put_batch(b, mesh),
                                 size=config.data.prefetch)
    state = run.resume(state, identity, data_iterator=data_iter,
                       sampler=data.loader.global_sampler)
    save_classes(run.workdir, train_source, config.data.name)
    if not run.start and config.model.get("init_from"):
      state, _ = model_file.initial_state(state, config.model.init_from)
      state = jax.device_put(state, state_sharding)
    if not run.start and pretrained is not None:
      state = build.insert_pretrained(state, pretrained, state_sharding)
      logging.info("Backbone from %s: %s %s weights (%s preprocessing)",
                   config.model.pretrained, pretrained_meta["source"], pretrained_meta["arch"],
                   pretrained_meta["preprocessing_name"])

    preprocess = (make_normalize() if preprocessing == "imagenet"
                  else weights.make_preprocess(preprocessing))
    train_step, eval_step = jit_steps(config, mesh, state_sharding, num_classes, ignore,
                                      preprocess, data.eval_window, weights_per_class)
    label = build.model_label(config)
    logging.info("%s, %d classes, %s params, dtype %s, %d devices, global batch %d", label,
                 num_classes, f"{num_params:,}", jnp.dtype(dtype).name, mesh.devices.size,
                 config.train.batch_size)

    def evaluate(state, step):
      del step
      confusion, kept = confusion_over(eval_step, state, val_source, mesh, eval_batch,
                                       num_classes, validate, num_eval,
                                       keep=config.train.num_prediction_images,
                                       operations=data.eval_operations, skip_log=data.skip_log)
      summary = metrics.summarize(confusion)
      return loop.Evaluation({f"eval/{k}": summary[k] for k in EVAL_KEYS}, (summary, kept))

    try:
      state = run.train(state, train_step, lambda step: next(data_iter), evaluate=evaluate,
                        data_iterator=data_iter)
    finally:
      data_iter.close()
    summary, kept = run.final.result
    result = run.write_summary(state, {
        **{k: summary[k] for k in (*EVAL_KEYS, "per_class_iou", "per_class_dice", "precision",
                                   "recall")},
        "class_names": list(train_source.class_names),
        "model": config.model.name, "backbone": config.model.backbone,
        "pretrained": (f"{pretrained_meta['source']}:{pretrained_meta['arch']}"
                       if pretrained_meta else None),
        "dataset": config.data.name, "image_size": list(data.image_shape[:2]),  # train crops
        "eval_window": list(data.eval_window) if data.eval_window else None,  # None: whole
        "num_params": num_params, "dtype": jnp.dtype(dtype).name,
        "in_channels": data.image_shape[-1], "class_weights": weights_per_class,
        "init_from": config.model.get("init_from") or None,
        # Bad examples left out (data.skip_bad_examples): found while listing the dataset,
        # and met while reading it (listed in skipped_examples.jsonl).
        "skipped_examples": (len(getattr(train_source, "skipped", ())) +
                             len(getattr(val_source, "skipped", ())) +
                             pipeline.count_logged(data.skip_log)),
        "eval_examples": min(len(val_source), num_eval or len(val_source)),
    }, mesh)
    if jax.process_index() == 0:
      _pictures(run, model, state, kept, preprocess, train_source, summary, config)
      logging.info("Per-class results:\n%s",
                   metrics.class_table(summary, train_source.class_names))
  return result


def _pictures(run, model, state, kept, preprocess, source, summary, config) -> None:
  """predictions.png (and attention.png for a model with attention gates)."""
  if not kept["image"]:
    return
  images = np.stack(kept["image"])
  try:
    shown = visualize.as_rgb(images, config.data.get("display_bands"))
  except ValueError as e:
    raise JaxsegError(str(e)) from None
  visualize.prediction_grid(
      run.path("predictions.png"), shown, np.stack(kept["label"]),
      np.stack(kept["prediction"]), source.class_names, source.palette,
      ignore_index=source.ignore_index,
      title=f"{build.model_label(config)} on {config.data.name} "
            f"(val mIoU {metrics.fmt_score(summary['miou'])})")
  if getattr(model, "attention", False):
    attention_figure(run.path("attention.png"), state, images, preprocess,
                     f"{config.model.name} attention gates on {config.data.name}", shown)
