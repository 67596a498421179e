"""The training features every task shares: the weight average (train.ema_decay), the best
checkpoint (train.keep_best) and gradient accumulation (train.accumulate_steps)."""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxseg import runs
from jaxseg.errors import JaxsegError
from jaxseg.train import build, ema, segmentation, sharding, steps
from jaxseg.train.state import TrainState
from tests import helpers

K = 4


class NoNormNet(nn.Module):
  """Two convolutions, no BatchNorm: accumulated micro-batches must equal the whole batch."""

  @nn.compact
  def __call__(self, x, *, train: bool):
    del train
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    return nn.Conv(K, (1, 1))(x)


def _ce(logits, labels):
  loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return jnp.mean(loss), {"ce": jnp.mean(loss)}


def _state(model, with_ema=False):
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           tx=optax.sgd(0.1), batch_stats=variables.get("batch_stats", {}),
                           rng=jax.random.key(1), with_ema=with_ema)


def _batch(n=8, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (n, 16, 16, 3), np.uint8),
          "label": rng.integers(0, K, (n, 16, 16)).astype(np.int32)}


def _step(accumulate, mesh=None, **kwargs):
  step = steps.make_train_step(_ce, lambda x: x.astype(jnp.float32) / 255.0,
                               optax.constant_schedule(0.1), accumulate_steps=accumulate,
                               **kwargs)
  if mesh is None:
    return jax.jit(step)
  replicated = sharding.replicated(mesh)
  jitted = jax.jit(step, in_shardings=(replicated, sharding.batch_sharding(mesh)))
  return lambda state, batch: jitted(jax.device_put(state, replicated),
                                     sharding.put_batch(batch, mesh))


@pytest.mark.parametrize("sequential", [None, True])  # this backend's form, and lax.scan's
def test_four_micro_batches_of_two_equal_one_batch_of_eight_without_batchnorm(sequential):
  state, batch = _state(NoNormNet()), _batch()
  whole, out_whole = _step(1)(state, batch)
  micro, out_micro = _step(4, sequential=sequential)(state, batch)
  np.testing.assert_allclose(out_micro["loss"], out_whole["loss"], rtol=1e-5)
  np.testing.assert_allclose(out_micro["loss_ce"], out_whole["loss_ce"], rtol=1e-5)
  np.testing.assert_allclose(out_micro["grad_norm"], out_whole["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               micro.params, whole.params)
  assert not np.allclose(jax.tree.leaves(whole.params)[0], jax.tree.leaves(state.params)[0])


def test_accumulation_with_batchnorm_differs_as_documented():
  """BatchNorm normalises each micro-batch with its own statistics, so the loss is not the
  whole batch's (docs/training.md); the running statistics still move once per step."""
  model = build.segmentation_model(helpers.tiny_config(), K)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)
  state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                            tx=optax.sgd(0.0), batch_stats=variables["batch_stats"],
                            rng=jax.random.key(1))
  batch = _batch()
  whole, out_whole = _step(1)(state, batch)
  micro, out_micro = _step(2)(state, batch)
  assert abs(float(out_micro["loss"]) - float(out_whole["loss"])) > 1e-4
  for new, old in zip(jax.tree.leaves(micro.batch_stats), jax.tree.leaves(state.batch_stats)):
    assert np.all(np.isfinite(new))
  assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(micro.batch_stats),
                                                   jax.tree.leaves(state.batch_stats)))


def test_accumulated_step_is_the_same_on_1_and_8_devices():
  state, batch = _state(NoNormNet()), _batch(16)
  one, out1 = _step(2, sharding.make_mesh(jax.devices()[:1]))(state, batch)
  eight, out8 = _step(2, sharding.make_mesh(jax.devices()[:8]))(state, batch)
  np.testing.assert_allclose(out8["loss"], out1["loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               jax.device_get(eight.params), jax.device_get(one.params))


def test_a_batch_that_does_not_split_over_micro_batches_and_devices_is_one_line():
  config = helpers.tiny_config(**{"train.accumulate_steps": 3})
  with pytest.raises(JaxsegError, match=r"--config.train.accumulate_steps=3: train.batch_size=8 "
                                        r"must be divisible by accumulate_steps x the 8 devices"):
    build.accumulate_steps(config, sharding.make_mesh())


# --- the weight average ---------------------------------------------------------------------------


def test_the_average_follows_tensorflows_warmup_and_skips_nonfinite_steps():
  state, batch = _state(NoNormNet(), with_ema=True), _batch()
  step = _step(1, ema_decay=0.99)
  new, _ = step(state, batch)
  # t = 0: decay min(0.99, 1/10) = 0.1, the average moves 90% of the way to the new weights.
  leaf = lambda tree: np.asarray(jax.tree.leaves(tree)[0])
  np.testing.assert_allclose(leaf(new.ema["params"]),
                             0.1 * leaf(state.ema["params"]) + 0.9 * leaf(new.params), rtol=1e-5)
  late = new.replace(step=jnp.asarray(10_000, jnp.int32))
  newer, _ = step(late, batch)
  np.testing.assert_allclose(leaf(newer.ema["params"]),
                             0.99 * leaf(late.ema["params"]) + 0.01 * leaf(newer.params),
                             rtol=1e-5)
  assert float(ema.warmup_decay(0.99, 3)) == pytest.approx(4 / 13)
  poisoned = late.replace(params=jax.tree.map(lambda x: x * jnp.nan, late.params))
  skipped, out = step(poisoned, batch)
  assert not bool(out["finite"])
  jax.tree.map(np.testing.assert_array_equal, skipped.ema, late.ema)


def test_a_run_without_the_average_has_no_extra_leaves():
  """Off, the average adds nothing to the state: checkpoints of earlier runs still restore."""
  plain, averaged = _state(NoNormNet()), _state(NoNormNet(), with_ema=True)
  assert plain.ema is None
  assert len(jax.tree.leaves(averaged)) == len(jax.tree.leaves(plain)) + len(
      jax.tree.leaves(plain.params))


# --- end to end: segmentation -------------------------------------------------------------------

FEATURES = {"train.ema_decay": 0.9, "train.keep_best": "miou", "train.eval_every": 2,
            "train.keep_checkpoints": 1, "train.checkpoint_every": 100,
            "optim.schedule": "constant"}  # so that a 4-step run is the start of a 6-step one


@pytest.fixture(scope="module")
def featured(tmp_path_factory):
  """One 6-step run with all three features (2 micro-batches on 8 devices: batch 16)."""
  workdir = str(tmp_path_factory.mktemp("featured"))
  config = helpers.tiny_config(steps=6, **FEATURES, **{"train.accumulate_steps": 2,
                                                         "train.batch_size": 16})
  return workdir, config, segmentation.train_and_evaluate(config, workdir)


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_evaluation_reports_raw_and_averaged_scores(featured):
  workdir, _, summary = featured
  evaluated = [r for r in _rows(workdir) if "eval/miou" in r]
  assert [r["step"] for r in evaluated] == [2, 4, 6]
  for row in evaluated:
    for key in ("miou", "pixel_accuracy", "mean_dice", "mean_accuracy"):
      assert 0 <= row[f"eval/ema/{key}"] <= 1
  assert summary["weights"] == "ema"
  assert summary["ema/miou"] == evaluated[-1]["eval/ema/miou"]
  assert summary["miou"] == evaluated[-1]["eval/miou"]
  assert summary["miou"] != summary["ema/miou"]  # two sets of weights, scored separately


def test_the_best_checkpoint_is_kept_beside_the_last_and_load_run_returns_it(featured):
  workdir, _, summary = featured
  evaluated = {r["step"]: r["eval/miou"] for r in _rows(workdir) if "eval/miou" in r}
  best = max(sorted(evaluated), key=lambda s: (evaluated[s], s))
  assert summary["best_step"] == best and summary["best_metric"] == "miou"
  assert summary["best_value"] == evaluated[best]
  kept = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert kept == sorted({best, 6})  # keep_checkpoints=1: the last, and the best
  run = runs.load_run(workdir)
  assert (run.step, run.weights_source) == (best, "ema")
  latest = runs.load_run(workdir, checkpoint="latest", weights="raw")
  assert (latest.step, latest.weights_source) == (6, "raw")
  with pytest.raises(JaxsegError, match=r"--checkpoint=3: .* holds steps"):
    runs.load_run(workdir, checkpoint=3)


def test_load_run_gives_the_averaged_weights_the_loop_scored(featured):
  workdir, config, _ = featured
  from jaxseg import evaluate  # pylint: disable=g-import-not-at-top
  from jaxseg.data.from_config import make_source  # pylint: disable=g-import-not-at-top
  source = make_source(config, config.data.val_split)
  scores = {}
  for weights in ("ema", "raw"):
    model = runs.load_run(workdir, checkpoint="latest", weights=weights)
    scores[weights] = evaluate.evaluate(model, source, batch_size=8,
                                        num_examples=8).summary["miou"]
  last = [r for r in _rows(workdir) if r.get("step") == 6 and "eval/miou" in r][0]
  assert scores["raw"] == pytest.approx(last["eval/miou"], abs=1e-12)
  assert scores["ema"] == pytest.approx(last["eval/ema/miou"], abs=1e-12)


def test_resuming_continues_the_same_run_with_the_same_best(featured, tmp_path):
  """Stopped at step 4 (train.steps=4), then run to 6: the same figures as without a stop,
  and the best checkpoint survives the restart."""
  _, config, summary = featured
  workdir = str(tmp_path / "resumed")
  first = config.copy_and_resolve_references()
  first.train.steps = 4
  segmentation.train_and_evaluate(first, workdir)
  resumed = segmentation.train_and_evaluate(config, workdir)
  assert resumed["resumed_from"] == 4
  for key in ("miou", "ema/miou", "best_step", "best_value"):
    assert resumed[key] == summary[key], key


@pytest.mark.parametrize("overrides, message", [
    ({"train.keep_best": "miou", "train.eval_every": 0},
     r"--config.train.keep_best='miou' needs evaluations to choose from: set "
     r"--config.train.eval_every > 0"),
    ({"train.keep_best": "ema/miou", "train.eval_every": 2},
     r"keep_best='ema/miou' needs the weight average: set --config.train.ema_decay"),
    ({"train.keep_best": "loss", "train.eval_every": 2},
     r"--config.train.keep_best='loss' is not one of: miou, "),
    ({"train.ema_decay": 1.0}, r"--config.train.ema_decay=1.0 must be"),
    ({"train.accumulate_steps": 0}, r"--config.train.accumulate_steps=0 must be"),
])
def test_bad_settings_are_one_line(overrides, message):
  with pytest.raises(JaxsegError, match=message):
    build.validate(helpers.tiny_config(**overrides))


def test_turning_the_average_on_when_resuming_is_refused(featured, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(featured[0], workdir)
  config = featured[1].copy_and_resolve_references()
  config.train.ema_decay = 0.5
  with pytest.raises(JaxsegError, match=r"--config.train.ema_decay=0.5: .* was trained with 0.9"):
    segmentation.train_and_evaluate(config, workdir)
