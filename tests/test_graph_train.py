"""The superpixel GNN's training loop: pixel metrics from node histograms, the oracle, graph
flips, the batch order, 1 vs 8 devices, exact resume, the hybrid mode and the experiment."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments.configs import superpixel_gnn as gnn_config
from jaxseg import evaluate, metrics, runs
from jaxseg.data import from_config, graph_data, superpixels as sp
from jaxseg.train import distributed, graph, optim, segmentation, sharding
from jaxseg.train.state import TrainState
from jaxseg.models.superpixel_gnn import SuperpixelGNN
from tests import helpers

K = 4
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _example(seed, h=16, w=20, n=12):
  rng = np.random.default_rng(seed)
  segments = sp.relabel(rng.integers(0, n, (h, w)))
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  label = rng.integers(0, K, (h, w)).astype(np.uint8)
  label[rng.random((h, w)) < 0.1] = 255
  return segments, image, label


def _graph(seed):
  segments, image, label = _example(seed)
  return sp.region_graph(segments, image, label, num_classes=K)


def test_confusion_from_node_histograms_equals_painted_pixels():
  segments, image, label = _example(0)
  g = sp.region_graph(segments, image, label, num_classes=K)
  predictions = np.random.default_rng(1).integers(0, K, len(g.nodes))
  want = metrics.confusion_matrix(label, sp.nodes_to_pixels(segments, predictions), K)
  got = graph.graph_confusion(g.histogram, predictions, K)
  np.testing.assert_array_equal(got, want)
  # The oracle: the painted majority labels.
  oracle = sp.oracle_labels(segments, label, K)
  np.testing.assert_array_equal(
      graph.oracle_confusion(graph_data.GraphSet([g], np.arange(1), {}), K),
      metrics.confusion_matrix(label, oracle, K))


def test_superpixel_vote_of_pooled_probabilities_equals_painted_argmax():
  segments, image, label = _example(3)
  probabilities = np.random.default_rng(4).dirichlet(np.ones(K), segments.shape)
  g = sp.region_graph(segments, image, label, num_classes=K)
  g.nodes = np.concatenate([g.nodes, graph_data.pool(segments, probabilities)], -1)
  votes = np.stack([probabilities[segments == n].mean(0) for n in range(len(g.nodes))])
  painted = sp.nodes_to_pixels(segments, votes.argmax(1))
  np.testing.assert_array_equal(
      graph.pooled_cnn_confusion(graph_data.GraphSet([g], np.arange(1), {}), K),
      metrics.confusion_matrix(label, painted, K))


def test_hflip_equals_the_graph_of_the_mirrored_image():
  segments, image, label = _example(2)
  g = sp.region_graph(segments, image, label, num_classes=K)
  mirrored = sp.region_graph(segments[:, ::-1], image[:, ::-1], label[:, ::-1], num_classes=K)
  np.testing.assert_allclose(sp.hflip(g).nodes, mirrored.nodes, atol=1e-6)
  np.testing.assert_array_equal(mirrored.senders, g.senders)
  np.testing.assert_allclose(mirrored.edges, g.edges, atol=1e-6)


def test_batches_visit_every_example_once_per_epoch_and_repeat_by_step():
  n, batch = 10, 4
  seen = np.concatenate([graph.batch_indices(s, n, batch, seed=3) for s in range(1, 6)])
  np.testing.assert_array_equal(np.sort(seen[:n]), np.arange(n))
  np.testing.assert_array_equal(np.sort(seen[n:2 * n]), np.arange(n))
  assert not np.array_equal(seen[:n], seen[n:2 * n])  # a new order each epoch
  np.testing.assert_array_equal(graph.batch_indices(4, n, batch, 3), seen[12:16])


def test_short_last_batch_leaves_devices_that_count_nowhere():
  graphs = [_graph(s) for s in range(3)]
  batch = graph_data.device_batch(graphs, 4, nodes_per_graph=16, edges_per_graph=200,
                                  graphs_per_device=1)
  assert batch.nodes["features"].shape == (4, 17, sp.NODE_FEATURES)
  predictions = np.zeros(batch.nodes["target"].shape, np.int32)
  got = graph.graph_confusion(batch.nodes["histogram"], predictions, K)
  want = sum(graph.graph_confusion(g.histogram, np.zeros(len(g.nodes), np.int32), K)
             for g in graphs)
  np.testing.assert_array_equal(got, want)
  assert batch.nodes["weight"][3].sum() == 0


def _one_step(mesh, graphs, micro=1):
  model = SuperpixelGNN(num_classes=K, hidden=16, num_layers=2, dropout_rate=0.0)
  budget = graph.Budget(len(graphs) // mesh.devices.size, 16, 200)
  batch = graph.local_batch(graphs, np.arange(len(graphs)), mesh, budget, 255, micro=micro)
  example = jax.tree.map(lambda x: x[0, 0] if micro > 1 else x[0], batch)
  params = model.init(jax.random.key(0), example, train=False)["params"]
  schedule = optim.make_schedule("constant", 1e-2, 10)
  state = TrainState.create(apply_fn=model.apply, params=params, batch_stats={},
                            tx=optim.make_optimizer("adamw", schedule), rng=jax.random.key(1))
  train_step, _ = graph.make_steps(schedule, K, accumulate_steps=micro)
  replicated = sharding.replicated(mesh)
  step = jax.jit(train_step, in_shardings=(replicated, sharding.batch_sharding(mesh)))
  state, out = step(jax.device_put(state, replicated), graph._put(batch, mesh))
  return jax.device_get(state.params), float(out["loss"])


def test_one_step_is_the_same_on_1_and_8_devices():
  graphs = [_graph(s) for s in range(8)]
  params1, loss1 = _one_step(sharding.make_mesh(jax.devices()[:1]), graphs)
  params8, loss8 = _one_step(sharding.make_mesh(jax.devices()[:8]), graphs)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               params8, params1)


@pytest.mark.parametrize("devices, micro", [(1, 4), (2, 2)])
def test_accumulated_micro_batches_equal_the_whole_batch(devices, micro):
  """Each micro-batch's loss counts by its pixel weight: with no BatchNorm in the GNN, 4
  micro-batches of 2 graphs are one batch of 8, exactly (to rounding)."""
  graphs = [_graph(s) for s in range(8)]
  mesh = sharding.make_mesh(jax.devices()[:devices])
  params1, loss1 = _one_step(mesh, graphs)
  params_micro, loss_micro = _one_step(mesh, graphs, micro)
  np.testing.assert_allclose(loss_micro, loss1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               params_micro, params1)


def _config(steps, **overrides):
  config = gnn_config.get_config()
  config.data.image_size = 32
  config.data.num_train_examples = 24
  config.train.num_eval_examples = 8
  config.superpixels.n_segments = 24
  config.model.hidden = 16
  config.model.num_layers = 2
  config.train.steps = steps
  config.train.batch_size = 8
  config.train.log_every = 1
  config.train.checkpoint_every = 2
  config.train.num_prediction_images = 2
  config.optim.schedule = "constant"  # so that a 2-step run is the start of a 4-step one
  config.optim.warmup_steps = 0
  for key, value in overrides.items():
    section, name = key.split("__")
    config[section][name] = value
  return config


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


# The shared training features, on: the weight average, the best checkpoint, 2 micro-batches.
FEATURES = dict(train__ema_decay=0.9, train__keep_best="ema/miou", train__eval_every=2,
                train__accumulate_steps=2, train__batch_size=16, train__keep_checkpoints=1)


def test_sigterm_then_resume_gives_the_same_run_and_reuses_the_graphs(tmp_path, monkeypatch):
  whole = graph.train_and_evaluate(_config(4, **FEATURES), str(tmp_path / "whole"))
  with monkeypatch.context() as patch:
    helpers.sigterm_at_step(patch, 3)
    with pytest.raises(distributed.Preempted, match="saved step 3"):
      graph.train_and_evaluate(_config(4, **FEATURES), str(tmp_path / "split"))
  cache = tmp_path / "split" / "graphs" / "train.npz"
  built = cache.stat().st_mtime_ns
  resumed = graph.train_and_evaluate(_config(4, **FEATURES), str(tmp_path / "split"))
  assert cache.stat().st_mtime_ns == built  # reused, not rebuilt
  assert resumed["resumed_from"] == 3 and resumed["steps"] == 4
  assert _losses(tmp_path / "split") == _losses(tmp_path / "whole")
  for key in ("miou", "ema/miou", "best_step", "best_value"):
    assert resumed[key] == whole[key], key
  # Raw and averaged scores at each evaluation; the best by the averaged mIoU is what
  # load_run returns, with the averaged weights.
  with open(tmp_path / "whole" / "metrics.jsonl") as f:
    scored = {r["step"]: r["eval/ema/miou"] for r in map(json.loads, f) if "eval/miou" in r}
  assert sorted(scored) == [2, 4] and whole["best_step"] == max(scored, key=lambda s: (scored[s], s))
  run = runs.load_run(str(tmp_path / "whole"))
  assert (run.step, run.weights_source) == (whole["best_step"], "ema")
  # Pixel metrics at full resolution, bounded by the oracle in pixel accuracy.
  assert whole["oracle_pixel_accuracy"] >= whole["pixel_accuracy"]
  assert whole["superpixels"]["max_nodes"] <= 24 + 8 and whole["eval_examples"] == 8
  assert (tmp_path / "whole" / "predictions.png").read_bytes()[:4] == b"\x89PNG"


def test_hybrid_adds_the_cnn_probabilities_to_the_node_features(tmp_path):
  cnn = helpers.tiny_config(steps=2)
  cnn_summary = segmentation.train_and_evaluate(cnn, str(tmp_path / "cnn"))
  run = runs.load_run(str(tmp_path / "cnn"))
  # The restored model reproduces the run's own evaluation.
  val = from_config.make_sources(cnn)[1]
  confusion = sum(np.asarray(metrics.confusion_matrix(
      val[i]["label"], np.argmax(run.logits(val[i]["image"][None])[0], -1), run.num_classes))
                  for i in range(cnn.train.num_eval_examples))
  assert metrics.summarize(confusion)["miou"] == pytest.approx(cnn_summary["miou"], abs=1e-6)

  gnn = _config(2, hybrid__cnn_workdir=str(tmp_path / "cnn"))
  summary = graph.train_and_evaluate(gnn, str(tmp_path / "gnn"), cnn=run)
  assert summary["hybrid"]["model"] == "deeplabv3plus/tiny_resnet"
  # Restored as a pixel classifier (its CNN too), the GNN paints the same pixels as the
  # training loop's node-histogram evaluation.
  restored = runs.load_run(str(tmp_path / "gnn"))
  assert restored.cnn is not None and restored.step == 2
  result = evaluate.evaluate(restored, from_config.make_sources(gnn)[1], num_examples=8,
                             desc=None)
  assert result.summary["miou"] == summary["miou"]
  assert result.summary["pixel_accuracy"] == summary["pixel_accuracy"]
  assert 0 <= summary["hybrid"]["superpixel_vote_miou"] <= 1
  with np.load(tmp_path / "gnn" / "graphs" / "val.npz") as cache:
    assert cache["nodes"].shape[1] == sp.NODE_FEATURES + run.num_classes
    # Pooled probabilities: each node's extra features sum to 1.
    np.testing.assert_allclose(cache["nodes"][:, sp.NODE_FEATURES:].sum(1), 1.0, atol=1e-4)


def _experiment(*args):
  env = helpers.device_env(2)
  return subprocess.run([sys.executable, "-m", "experiments.superpixel_gnn", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_experiment_on_camvid_end_to_end(tmp_path):
  result = _experiment("--dataset=camvid", f"--data_dir={helpers.CAMVID}",
                       f"--workdir={tmp_path}", "--config.data.num_train_examples=4",
                       "--config.train.num_eval_examples=2", "--config.train.steps=2",
                       "--config.train.batch_size=2", "--config.superpixels.n_segments=100",
                       "--config.model.hidden=16", "--config.train.num_prediction_images=2")
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["dataset"] == "camvid" and summary["devices"] == 2
  assert len(summary["per_class_iou"]) == 11 and summary["eval_examples"] == 2
  assert 0.3 < summary["oracle_miou"] <= 1 and summary["superpixels"]["method"] == "jax"
  assert summary["oracle_pixel_accuracy"] >= summary["pixel_accuracy"]
  assert (tmp_path / "predictions.png").read_bytes()[:4] == b"\x89PNG"
  assert "superpixel oracle mIoU" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--config.model.layer=gin"],
     "error: --config.model.layer='gin' is not one of: graph_network, gat, gcn"),
    (["--config.superpixels.method=felzenszwalb"],
     "error: --config.superpixels.method='felzenszwalb' is not one of: jax, skimage"),
    (["--config.hybrid.cnn_workdir=/nowhere"],
     "error: --config.hybrid.cnn_workdir=/nowhere: no config.json there (is it the workdir of "
     "a segmentation run?)"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
  result = _experiment(*args, f"--workdir={tmp_path}", "--config.data.num_train_examples=2")
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == message, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
