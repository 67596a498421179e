"""The superpixel GNN training loop: `train_and_evaluate(config, workdir)`.

Every image of both splits becomes a region graph once (jaxseg.data.graph_data, cached in the
workdir). A step takes the global batch of graphs, gives each device its share padded to one
node/edge budget (stacked on a leading device axis that is sharded over the mesh), and vmaps
the GNN over that axis: data parallel under jit with replicated parameters, the loss a
pixel-weighted mean over every device's nodes. The batch of each step is a pure function of
(seed, step), so a resumed run sees the same batches without any iterator state.

Metrics are pixel metrics at full resolution without painting a pixel: a node's class
histogram is added into the confusion-matrix column of its predicted class. The superpixel
oracle (each superpixel takes its majority label) is reported beside them.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
from absl import logging

from jaxseg import metrics, visualize
from jaxseg.data import graph_data, sources, superpixels as sp
from jaxseg.data.files import channels
from jaxseg.data.from_config import make_sources
from jaxseg.errors import JaxsegError
from jaxseg.models.superpixel_gnn import node_loss
from jaxseg.train import build, loop, sharding
from jaxseg.train.checkpoint import param_shapes, tree_signature
from jaxseg.train.evaluation import EVAL_KEYS
from jaxseg.train.steps import apply_update, weighted_mean_over
from jaxseg.train.workdir import save_classes

def batch_indices(step: int, num_examples: int, batch_size: int, seed: int) -> np.ndarray:
  """Example indices of (1-based) `step`: consecutive slices of one seeded permutation per
  epoch, a batch straddling two epochs taking the end of one and the start of the next."""
  flat = (step - 1) * batch_size + np.arange(batch_size)
  epochs, positions = np.divmod(flat, num_examples)
  out = np.empty(batch_size, np.int64)
  for epoch in np.unique(epochs):
    order = np.random.default_rng([seed, int(epoch)]).permutation(num_examples)
    out[epochs == epoch] = order[positions[epochs == epoch]]
  return out


def flips(step: int, batch_size: int, seed: int) -> np.ndarray:
  """Which graphs of `step` are mirrored (a coin each, seeded by the step)."""
  return np.random.default_rng([seed, step, 1]).random(batch_size) < 0.5


def graph_confusion(histogram, predictions, num_classes: int):
  """int32 (K, K) pixel confusion [true, predicted] of node `predictions` (...,) whose
  class histograms are `histogram` (..., K); jittable."""
  rows = jax.ops.segment_sum(histogram.reshape(-1, num_classes).astype(jnp.int32),
                             predictions.reshape(-1), num_segments=num_classes)
  return rows.T


def oracle_confusion(graphs: graph_data.GraphSet, num_classes: int) -> np.ndarray:
  """The pixel confusion of the superpixel oracle: every node takes its majority class."""
  confusion = np.zeros((num_classes, num_classes), np.int64)
  for g in graphs.graphs:
    np.add.at(confusion.T, g.histogram.argmax(1), g.histogram)
  return confusion


def pooled_cnn_confusion(graphs: graph_data.GraphSet, num_classes: int) -> np.ndarray:
  """Hybrid mode's baseline without the GNN: each superpixel takes the argmax of the CNN
  probabilities averaged over it (its node features past the first NODE_FEATURES)."""
  confusion = np.zeros((num_classes, num_classes), np.int64)
  for g in graphs.graphs:
    np.add.at(confusion.T, g.nodes[:, sp.NODE_FEATURES:].argmax(1), g.histogram)
  return confusion


def make_steps(schedule, num_classes: int, accumulate_steps: int = 1, ema_decay: float = 0.0):
  """Pure train/eval steps over graphs stacked on a leading device axis (vmapped).

  With `accumulate_steps` > 1 the train batch holds that many micro-batches on its second
  axis (`local_batch(..., micro=...)`), run one after the other; each one's loss and
  gradients count by its pixel weight, so that they add up to the whole batch's exactly (the
  GNN has no BatchNorm)."""

  def train_step(state, graphs):
    rng, dropout_rng = jax.random.split(jax.random.wrap_key_data(state.rng))

    def loss_and_grads(graphs, dropout_rng):
      keys = jax.random.split(dropout_rng, graphs.n_node.shape[0])

      def compute_loss(params):
        logits = jax.vmap(lambda g, k: state.apply_fn(
            {"params": params}, g, train=True, rngs={"dropout": k}))(graphs, keys)
        return node_loss(logits.reshape(-1, num_classes), graphs.nodes["target"].reshape(-1),
                         graphs.nodes["weight"].reshape(-1))

      return jax.value_and_grad(compute_loss)(state.params)

    if accumulate_steps == 1:
      loss, grads = loss_and_grads(graphs, dropout_rng)
    else:
      micro = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), graphs)  # (micro, device, ...)
      loss, grads = weighted_mean_over(
          lambda m: loss_and_grads(*m), (micro, jax.random.split(dropout_rng, accumulate_steps)),
          weight=lambda m: jnp.sum(m[0].nodes["weight"]))
    return apply_update(state, loss, grads, state.batch_stats, rng, schedule,
                        ema_decay=ema_decay)

  def eval_step(state, graphs):
    logits = jax.vmap(lambda g: state.apply_fn({"params": state.params}, g, train=False))(
        graphs)
    predictions = jnp.argmax(logits, -1)
    return graph_confusion(graphs.nodes["histogram"], predictions, num_classes), predictions

  return train_step, eval_step


@dataclasses.dataclass
class Budget:
  """Static shapes of a device's share: graphs, and nodes/edges per graph (the maxima of the
  data, so every batch fits)."""
  graphs_per_device: int
  nodes_per_graph: int
  edges_per_graph: int


def _put(tree, mesh):
  """This process's device shares (leading axis) -> global arrays sharded over the mesh."""
  spec = sharding.batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(spec, x), tree)


def local_batch(graphs, indices, mesh, budget: Budget, ignore_index: int, mirror=None,
                micro: int = 1):
  """The padded, device-stacked GraphsTuple of this process's share of global `indices`.

  With `micro` > 1, each device's graphs are split into that many micro-batches (of
  graphs_per_device / micro graphs each), stacked on a second axis: (devices, micro, ...)."""
  if micro > 1:
    shape = (-1, micro, budget.graphs_per_device // micro)  # (global devices, micro, graphs)
    split = lambda a: None if a is None else np.asarray(a).reshape(shape)
    by_device, flipped = split(indices), split(mirror)
    share = dataclasses.replace(budget, graphs_per_device=budget.graphs_per_device // micro)
    parts = [local_batch(graphs, by_device[:, i].reshape(-1), mesh, share, ignore_index,
                         None if flipped is None else flipped[:, i].reshape(-1))
             for i in range(micro)]
    return jax.tree.map(lambda *xs: np.stack(xs, 1), *parts)
  local = len(mesh.local_devices)
  per_process = local * budget.graphs_per_device
  # Devices are ordered by process in the mesh, so process p holds the p-th slice.
  here = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
  mine = indices[here]
  flipped = mirror[here] if mirror is not None else np.zeros(len(mine), bool)
  chosen = [sp.hflip(graphs[i]) if f else graphs[i] for i, f in zip(mine, flipped)]
  return graph_data.device_batch(
      chosen, local, nodes_per_graph=budget.nodes_per_graph,
      edges_per_graph=budget.edges_per_graph, graphs_per_device=budget.graphs_per_device,
      ignore_index=ignore_index)


def evaluate_graphs(eval_step, state, graphs: graph_data.GraphSet, mesh, budget: Budget,
             num_classes: int, ignore_index: int, keep: dict[int, np.ndarray] | None = None):
  """(int64 confusion over the split, {source index: node predictions} for `keep`)."""
  confusion = np.zeros((num_classes, num_classes), np.int64)
  per_step = mesh.devices.size * budget.graphs_per_device
  position = {int(i): p for p, i in enumerate(graphs.indices)}
  wanted = {position[i]: i for i in (keep or {}) if i in position}
  kept = {}
  for start in range(0, len(graphs), per_step):
    indices = np.arange(start, min(start + per_step, len(graphs)))
    batch = local_batch(graphs.graphs, indices, mesh, budget, ignore_index)
    cm, predictions = eval_step(state, _put(batch, mesh))
    confusion += np.asarray(jax.device_get(cm), np.int64)
    hits = [p for p in indices if p in wanted]
    if hits:  # the same on every process: the gather is a collective
      # Every process's graphs of the batch, for process 0 to draw.
      predictions = np.asarray(multihost_utils.process_allgather(predictions, tiled=True))
    if hits and jax.process_index() == 0:
      for p in hits:
        device, slot = divmod(int(p - start), budget.graphs_per_device)
        offset = int(batch.n_node[device, :slot].sum())
        kept[wanted[p]] = predictions[device, offset:offset + len(graphs.graphs[p].nodes)]
  return confusion, kept


def _pictures(path, val, graphs: graph_data.GraphSet, predictions, title: str) -> None:
  """image with superpixel boundaries | ground truth | superpixel oracle | prediction."""
  rows = {"image": [], "label": [], "oracle": [], "prediction": []}
  for i in sorted(predictions):
    example, segments = val[i], graphs.segments[i]
    graph = graphs.graphs[int(np.flatnonzero(graphs.indices == i)[0])]
    image = example["image"].copy()
    image[sp.boundaries(segments)] = (255, 255, 0)
    rows["image"].append(image)
    rows["label"].append(example["label"])
    rows["oracle"].append(sp.nodes_to_pixels(segments, graph.targets))
    rows["prediction"].append(sp.nodes_to_pixels(segments, predictions[i]).astype(np.uint8))
  visualize.prediction_grid(path, np.stack(rows["image"]), np.stack(rows["label"]),
                            np.stack(rows["prediction"]), val.class_names, val.palette,
                            ignore_index=val.ignore_index, title=title,
                            extra_columns={"superpixel oracle": np.stack(rows["oracle"])})


def train_and_evaluate(config, workdir: str, cnn=None) -> dict[str, Any]:
  """Builds (or reuses) the graphs, trains (resuming from `workdir`), evaluates, writes
  summary.json, metrics.jsonl and predictions.png.

  Hybrid mode (config.hybrid.cnn_workdir) needs `cnn`, that run loaded as a model
  (jaxseg.runs.load_run, which the caller does: finished runs sit above the training layer):
  its class probabilities, pooled over each superpixel, join the node features.
  """
  build.validate(config)
  if config.hybrid.cnn_workdir and cnn is None:
    raise ValueError("hybrid mode: pass the run of config.hybrid.cnn_workdir as `cnn` "
                     "(jaxseg.runs.load_run)")
  with loop.Run(workdir, config, build.loop_settings(config),
                purpose="superpixel GNN training") as run:
    mesh = sharding.make_mesh()
    batch_size = config.train.batch_size
    sharding.check_batch_size(batch_size, mesh)
    eval_batch = config.train.eval_batch_size or batch_size
    sharding.check_batch_size(eval_batch, mesh, "train.eval_batch_size")
    micro = build.accumulate_steps(config, mesh)
    train_source, val_source = make_sources(config)  # the first data.num_train_examples
    if channels(train_source) != (3, np.uint8):
      raise JaxsegError(f"superpixel_gnn segments 8-bit RGB images (SLIC works in Lab colour); "
                        f"{train_source!r} has {channels(train_source)[0]}-channel "
                        f"{channels(train_source)[1].name} ones: train a CNN on them instead")
    if config.train.num_eval_examples:
      val_source = sources.Subset(val_source, config.train.num_eval_examples)
    num_classes, ignore = train_source.num_classes, train_source.ignore_index

    superpixels = build.superpixels(config)
    model = build.gnn_model(config, num_classes)
    pixel_features, hybrid = None, None
    if cnn is not None:
      if cnn.num_classes != num_classes:
        raise JaxsegError(f"--config.hybrid.cnn_workdir={config.hybrid.cnn_workdir} predicts "
                          f"{cnn.num_classes} classes but {config.data.name} has {num_classes}")
      pixel_features = lambda images: np.asarray(cnn.probabilities(images))
      hybrid = {"cnn_workdir": os.path.abspath(config.hybrid.cnn_workdir), "step": cnn.step,
                "model": cnn.name}
    n_pictures = min(config.train.num_prediction_images, len(val_source))
    keep = (np.linspace(0, len(val_source) - 1, n_pictures).astype(int).tolist()
            if n_pictures else [])
    t_build = time.perf_counter()
    common = dict(superpixels=superpixels, batch_size=config.superpixels.batch_size,
                  pixel_features=pixel_features, key_extra=hybrid)
    train_graphs = graph_data.cached_build(run.path("graphs", "train.npz"), train_source,
                                           desc="train graphs", **common)
    val_graphs = graph_data.cached_build(run.path("graphs", "val.npz"), val_source, keep=keep,
                                         desc="val graphs", **common)
    build_seconds = time.perf_counter() - t_build
    both = train_graphs.graphs + val_graphs.graphs
    nodes_max = max(len(g.nodes) for g in both)
    edges_max = max(len(g.senders) for g in both)
    train_budget = Budget(batch_size // mesh.devices.size, nodes_max, edges_max)
    eval_budget = Budget(eval_batch // mesh.devices.size, nodes_max, edges_max)

    example = jax.tree.map(lambda x: x[0], local_batch(
        train_graphs.graphs, np.arange(min(train_budget.graphs_per_device, len(train_graphs))),
        mesh, train_budget, ignore))
    state, state_sharding = build.materialize(build.gnn_init(config, model, example),
                                              config.train.seed, mesh)
    num_params = int(sum(x.size for x in jax.tree.leaves(state.params)))
    schedule, _ = build.optimizer(config)
    train_step, eval_step = make_steps(schedule, num_classes, micro, build.ema_decay(config))
    data_sharding = sharding.batch_sharding(mesh)
    train_step = jax.jit(train_step, in_shardings=(state_sharding, data_sharding),
                         out_shardings=(state_sharding, sharding.replicated(mesh)),
                         donate_argnums=0)
    eval_step = jax.jit(eval_step, in_shardings=(state_sharding, data_sharding),
                        out_shardings=(sharding.replicated(mesh), data_sharding))

    identity = {"model": "superpixel_gnn", "backbone": None, "num_classes": num_classes,
                "params": param_shapes(state.params),
                "opt_state": tree_signature(state.opt_state),
                "train_data": f"{train_source!r} {superpixels} hybrid={hybrid}",
                "global_batch_size": batch_size}
    state = run.resume(state, identity)
    save_classes(run.workdir, train_source, config.data.name)
    logging.info("superpixel_gnn (%s), %d classes, %s params, %d devices, global batch %d; "
                 "graphs: %d train, %d val, up to %d nodes and %d edges",
                 config.model.layer, num_classes, f"{num_params:,}", mesh.devices.size,
                 batch_size, len(train_graphs), len(val_graphs), nodes_max, edges_max)

    def next_batch(step):
      # The batch of a step is a pure function of (seed, step): nothing to checkpoint.
      indices = batch_indices(step, len(train_graphs), batch_size, config.train.seed)
      mirror = flips(step, batch_size, config.train.seed) if config.data.flip else None
      return _put(local_batch(train_graphs.graphs, indices, mesh, train_budget, ignore,
                              mirror, micro), mesh)

    def evaluate(state, step):
      del step
      confusion, kept = evaluate_graphs(eval_step, state, val_graphs, mesh, eval_budget,
                                        num_classes, ignore, keep=val_graphs.segments)
      summary = metrics.summarize(confusion)
      return loop.Evaluation({f"eval/{k}": summary[k] for k in EVAL_KEYS}, (summary, kept))

    state = run.train(state, train_step, next_batch, evaluate=evaluate)
    summary, kept = run.final.result

    oracle = metrics.summarize(oracle_confusion(val_graphs, num_classes))
    if hybrid is not None:
      hybrid["superpixel_vote_miou"] = metrics.summarize(
          pooled_cnn_confusion(val_graphs, num_classes))["miou"]
    result = run.write_summary(state, {
        **{k: summary[k] for k in (*EVAL_KEYS, "per_class_iou", "per_class_dice", "precision",
                                   "recall")},
        # Every superpixel labelled with its majority class: the best any superpixel
        # classifier can do with these superpixels.
        "oracle_miou": oracle["miou"], "oracle_pixel_accuracy": oracle["pixel_accuracy"],
        "oracle_per_class_iou": oracle["per_class_iou"],
        "class_names": list(train_source.class_names),
        "graph_build_seconds": round(build_seconds, 2),
        "superpixels": {**dataclasses.asdict(superpixels),
                        "mean_nodes": float(np.mean([len(g.nodes) for g in both])),
                        "mean_edges": float(np.mean([len(g.senders) for g in both])),
                        "max_nodes": nodes_max, "max_edges": edges_max},
        "hybrid": hybrid, "model": "superpixel_gnn", "layer": config.model.layer,
        "dataset": config.data.name, "num_params": num_params,
        "dtype": jnp.dtype(build.compute_dtype(config.model.dtype)).name,
        "skipped_examples": train_graphs.skipped + val_graphs.skipped,
        "eval_examples": len(val_graphs),
    }, mesh)
    if jax.process_index() == 0:
      if kept:
        _pictures(run.path("predictions.png"), val_source, val_graphs, kept,
                  f"superpixel GNN ({config.model.layer}"
                  f"{', hybrid on ' + hybrid['model'] if hybrid else ''}) on "
                  f"{config.data.name}: val mIoU {metrics.fmt_score(summary['miou'])}, "
                  f"superpixel oracle {metrics.fmt_score(oracle['miou'])}")
      logging.info("Per-class results:\n%s", metrics.class_table(summary,
                                                                 train_source.class_names))
  return result
