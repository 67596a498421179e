"""The jitted train step: 1 vs 8 devices, its communication, non-finite steps, the data boundary,
batch checks."""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.data import pipeline
from jaxseg.errors import JaxsegError
from jaxseg.models import create_model
from jaxseg.train import build, segmentation, sharding
from tests import helpers


def _setup(devices, **overrides):
  config = helpers.tiny_config(**overrides)
  mesh = sharding.make_mesh(devices)
  model = create_model("deeplabv3plus", num_classes=5, backbone=config.model.backbone,
                       **build.model_kwargs(config))
  state, state_sharding = segmentation.create_train_state(
      config, model, mesh, (32, 32, 3))
  train_step, eval_step = segmentation.jit_steps(config, mesh, state_sharding, 5, 255)
  return mesh, state, train_step, eval_step


@pytest.fixture(scope="module")
def eight():
  """The 8-device set-up, compiled once; tests get a fresh copy of the initial state."""
  mesh, state, train_step, eval_step = _setup(jax.devices())
  initial = jax.device_get(state)
  fresh = lambda: jax.device_put(initial, sharding.replicated(mesh))
  return mesh, fresh, train_step, eval_step


def _batch(seed=0, n=8):
  rng = np.random.default_rng(seed)
  label = rng.integers(0, 5, (n, 32, 32)).astype(np.uint8)
  label[:, :4] = 255  # some ignored pixels
  return {"image": rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8), "label": label}


def test_one_step_on_8_devices_equals_1_device():
  assert jax.device_count() == 8
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    # SGD: updates are linear in the gradients, so reduction-order noise stays small (Adam's
    # first step is ~lr * sign(g), which flips for near-zero gradients).
    mesh, state, train_step, _ = _setup(devices, **{"optim.name": "sgd",
                                                    "optim.learning_rate": 0.1})
    initial = jax.device_get(state.params)
    state, out = train_step(state, sharding.put_batch(_batch(), mesh))
    assert len(state.params["classifier"]["kernel"].sharding.device_set) == len(devices)
    results.append(jax.device_get((out, state.params, state.batch_stats)))
  (out1, params1, stats1), (out8, params8, stats8) = results
  np.testing.assert_allclose(out1["loss"], out8["loss"], rtol=1e-5)
  np.testing.assert_allclose(out1["grad_norm"], out8["grad_norm"], rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               params1, params8)
  # Synchronised BN: the 8-device running statistics are those of the global batch.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               stats1, stats8)
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), params8, initial)
  assert max(jax.tree.leaves(moved)) > 1e-3  # the step really changed the parameters


@pytest.mark.parametrize("poison", ["classifier", "stem"])
def test_nonfinite_step_changes_nothing(poison, eight):
  mesh, fresh, train_step, _ = eight
  state = fresh()
  # A non-finite weight in the classifier gives NaN logits; in the stem it also makes the
  # BatchNorm batch statistics NaN, which optax.apply_if_finite would not stop.
  params = jax.tree.map(np.array, jax.device_get(state.params))  # writable copies
  if poison == "classifier":
    params["classifier"]["kernel"][0, 0] = np.inf
  else:
    params["backbone"]["stem"]["conv"]["kernel"][0, 0, 0, 0] = np.nan
  state = state.replace(params=jax.device_put(params, sharding.replicated(mesh)))
  before = jax.device_get((state.params, state.opt_state, state.batch_stats, state.rng))
  state, out = train_step(state, sharding.put_batch(_batch(), mesh))
  after = jax.device_get((state.params, state.opt_state, state.batch_stats, state.rng))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), before, after)
  assert not out["finite"] and int(state.step) == 1
  assert int(state.nonfinite_streak) == 1 and int(state.nonfinite_total) == 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(after[2]))


def test_finite_step_resets_streak_and_updates_everything(eight):
  mesh, fresh, train_step, _ = eight
  state = fresh()
  state = state.replace(nonfinite_streak=jnp.int32(3))
  before = jax.device_get((state.params, state.batch_stats, state.rng))
  state, out = train_step(state, sharding.put_batch(_batch(), mesh))
  after = jax.device_get((state.params, state.batch_stats, state.rng))
  assert out["finite"] and int(state.nonfinite_streak) == 0
  for a, b in zip(before, after):
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_training_stops_after_consecutive_nonfinite_steps(tmp_path):
  config = helpers.tiny_config(steps=30, **{"optim.learning_rate": 1e30, "optim.clip_norm": 0.0,
                                            "optim.name": "sgd", "train.checkpoint_every": 100})
  config.train.max_nonfinite_steps = 3
  with pytest.raises(FloatingPointError, match=r"3 consecutive steps with a non-finite loss"):
    segmentation.train_and_evaluate(config, str(tmp_path))
  rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert sum('"nonfinite_step": 1' in r for r in rows) == 3


def test_eval_step_counts_only_real_examples(eight):
  mesh, fresh, _, eval_step = eight
  state = fresh()
  batch = _batch()
  batch["mask"] = np.array([True] * 3 + [False] * 5)
  confusion, predictions = eval_step(state, sharding.put_batch(batch, mesh))
  confusion = np.asarray(confusion)
  assert confusion.sum() == 3 * 28 * 32  # 3 real examples, 4 of 32 rows ignored
  labels, preds = batch["label"][:3], np.asarray(predictions)[:3]
  valid = labels != 255
  expected = np.zeros((5, 5), np.int64)
  np.add.at(expected, (labels[valid], preds[valid]), 1)
  np.testing.assert_array_equal(confusion, expected)


def test_labels_outside_class_range_rejected_at_data_boundary():
  check = pipeline.ValidateLabels(5, 255, "SyntheticShapes(...)")
  ok = {"image": np.zeros((4, 4, 3), np.uint8), "label": np.array([[0, 4, 255, 1]] * 4, np.uint8)}
  assert check.map(ok) is ok
  bad = dict(ok, label=np.array([[0, 5, 7, 255]] * 4, np.uint8), name="frames/0001.png")
  with pytest.raises(JaxsegError, match=r"frames/0001.png: label values \[5, 7\] are outside 0..4"):
    check.map(bad)


def test_batch_not_divisible_by_devices_says_what_to_change():
  mesh = sharding.make_mesh()
  assert sharding.check_batch_size(16, mesh) == 16
  with pytest.raises(JaxsegError, match=r"batch_size=12 is not divisible by the 8 devices.*"
                                        r"multiple of 8 \(e.g. 8 or 16\)"):
    sharding.check_batch_size(12, mesh)


def _all_reduced_shapes(hlo: str) -> list[tuple[int, ...]]:
  """The operand shapes of every all-reduce in a compiled HLO module's text."""
  shapes = []
  for line in hlo.splitlines():
    match = re.search(r"= (\(.*?\)|\S+) all-reduce(?:-start)?\(", line)
    if match:
      shapes += [tuple(int(d) for d in dims.split(",") if d)
                 for dims in re.findall(r"[a-z]+\d+\[([0-9,]*)\]", match.group(1))]
  return shapes


def test_the_step_communicates_by_all_reduce_of_each_gradient_once(eight):
  """Data parallelism as the compiler sees it: the batch stays sharded and the state
  replicated, so the 8-device step moves data only by all-reduce (no all-gather, all-to-all,
  collective-permute or reduce-scatter), every weight's gradient is in exactly one all-reduce,
  and the rest is the small vectors of synchronised BatchNorm and the loss."""
  mesh, fresh, train_step, _ = eight
  state = fresh()
  hlo = train_step.lower(state, sharding.put_batch(_batch(), mesh)).compile().as_text()
  for other in ("all-gather", "all-to-all", "collective-permute", "reduce-scatter"):
    assert f" {other}(" not in hlo and f" {other}-start(" not in hlo, other
  # Each weight's gradient in one all-reduce of its own: matched one to one, largest first.
  # Shapes compare as sorted sizes without unit axes, since a 1x1 conv's (1, 1, C, F) gradient
  # is reduced as the matrix product it comes from (layers.PointwiseConv), (C, F) or (F, C),
  # and a dilated conv's only over the taps that read the image (layers.DilatedConv): a
  # (kh, kw, C, F) kernel may be reduced as (a, b, C, F), a <= kh, b <= kw.
  squeeze = lambda shape: tuple(sorted(d for d in shape if d != 1))
  reduced = collections.Counter(squeeze(s) for s in _all_reduced_shapes(hlo))

  def forms(shape):
    if len(shape) != 4:
      return [squeeze(shape)]
    return [squeeze((a, b, *shape[2:])) for a in range(shape[0], 0, -1)
            for b in range(shape[1], 0, -1)]

  left = reduced.copy()
  matched = 0
  for kernel in sorted((x.shape for x in jax.tree.leaves(state.params) if x.ndim >= 2),
                       key=lambda shape: -int(np.prod(shape))):
    form = next((f for f in forms(kernel) if left[f] > 0), None)
    assert form is not None, f"no all-reduce for a gradient of shape {kernel}"
    left[form] -= 1
    matched += int(np.prod(form))
  # The rest: per BatchNorm layer, its statistics forward and its scale and bias gradients
  # (the sums its backward pass needs anyway), the biases and the loss -- vectors, not copies
  # of weights.
  vectors = sum(x.size for x in jax.tree.leaves(state.params) if x.ndim < 2)
  bn_channels = sum(x.size for x in jax.tree.leaves(state.batch_stats)) // 2
  rest = sum(int(np.prod(s)) * n for s, n in left.items())
  assert all(len(s) <= 1 for s, n in left.items() if n), left
  assert vectors <= rest <= vectors + 4 * bn_channels
