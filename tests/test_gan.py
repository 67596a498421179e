"""The GAN engine: a discriminator update lowers its loss on a fixed batch, the EMA, exact
resume through an Orbax round trip, and 1 vs 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxseg.models import mask_gan, sagan
from jaxseg.train import gan as gan_lib
from jaxseg.train import sharding
from tests import helpers


def _sagan(num_classes=3):
  return gan_lib.GAN(
      "sagan", sagan.Generator(resolution=16, num_classes=num_classes, ch=4,
                               channels=(2, 2), attention_resolution=8),
      sagan.Discriminator(resolution=16, num_classes=num_classes, ch=8, channels=(1, 2, 2),
                          attention_resolution=8), z_dim=8)


def _mask():
  return gan_lib.GAN(
      "mask", mask_gan.MaskToImageGenerator(num_classes=3, ch=4, channels=(2, 1), z_dim=8,
                                            attention_resolution=8),
      mask_gan.PatchDiscriminator(num_classes=3, ch=8, num_downsamples=2,
                                  attention_resolution=8), z_dim=8)


def _batch(n=8, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
          "label": rng.integers(0, 3, (n, 16, 16)).astype(np.int32),
          "class": rng.integers(0, 3, (n,)).astype(np.int32)}


def _state(gan, batch, sgd=False):
  # Adam's first step is about lr x sign(gradient), which turns rounding differences in
  # gradients that should be 0 (biases before a BatchNorm) into lr-sized ones; plain SGD keeps
  # a device-count comparison about the gradients.
  g_tx, d_tx = (optax.sgd(0.1), optax.sgd(0.1)) if sgd else gan_lib.make_optimizers()
  return gan_lib.init_state(gan, batch, jax.random.key(0), g_tx, d_tx)


_STEPS = {}


def _step(gan):
  """One compiled train step per GAN kind for the whole module (compiling is most of a test's
  time on CPU)."""
  if gan.kind not in _STEPS:
    _STEPS[gan.kind] = jax.jit(gan_lib.make_train_step(
        gan, feature_matching=1.0 if gan.kind == "mask" else 0.0))
  return _STEPS[gan.kind]


@pytest.mark.parametrize("make", [_sagan, _mask])
def test_a_step_lowers_the_discriminator_loss_on_a_fixed_batch(make):
  gan, batch = make(), _batch()
  state = _state(gan, batch)
  z = jax.random.normal(jax.random.key(5), (8, gan.z_dim))
  condition = gan.condition(batch)
  fake, _ = gan.generate(state.g.params, state.g.batch_stats, z, condition, train=False)
  real = gan_lib.to_signed(batch["image"])

  def d_loss(d):
    images = jnp.concatenate([real, fake])
    logits, _, _ = gan.discriminate(d.params, d.batch_stats, images, gan_lib._concat(condition),
                                    train=False)
    return float(gan_lib.hinge_d_loss(*jnp.split(logits, 2)))

  new, metrics = _step(gan)(state, batch)
  assert d_loss(new.d) < d_loss(state.d)
  assert np.isfinite(float(metrics["g_loss"]))
  # The EMA's warm-up: at step 0 its decay is 1/10, so it moved 90% of the way to the new
  # generator; late in training it is ema_decay (0.999): 0.1%.
  # It is the mechanism every task shares (jaxseg.train.ema): the generator's parameters and
  # its statistics (BatchNorm, spectral norms) are averaged alike.
  for part in ("params", "batch_stats"):
    leaf = lambda tree: jax.tree.leaves(tree)[0]
    np.testing.assert_allclose(leaf(new.ema[part]), 0.1 * leaf(state.ema[part])
                               + 0.9 * leaf(getattr(new.g, part)), rtol=1e-5, atol=1e-7)
  late = state.replace(step=jnp.asarray(100_000, jnp.int32))
  new, _ = _step(gan)(late, batch)
  np.testing.assert_allclose(leaf(new.ema["params"]), 0.999 * leaf(late.ema["params"]) + 0.001 *
                             leaf(new.g.params), rtol=1e-5, atol=1e-7)


def test_a_nonfinite_step_changes_nothing_but_the_counters():
  """The shared non-finite policy: here the update itself is NaN (a bad learning rate), with
  finite losses; both networks, their statistics, the EMA and the RNG stay."""
  gan, batch = _sagan(), _batch()
  nan_lr = optax.sgd(lambda count: count * 0 + jnp.nan)
  state = gan_lib.init_state(gan, batch, jax.random.key(0), nan_lr, optax.sgd(0.1))
  new, out = jax.jit(gan_lib.make_train_step(gan))(state, batch)
  assert not bool(out["finite"]) and int(out["nonfinite_streak"]) == 1
  assert np.isfinite(float(out["d_loss"]))
  assert int(new.step) == 1 and int(new.nonfinite_total) == 1
  for name in ("g", "d", "ema", "rng"):
    for a, b in zip(jax.tree.leaves(getattr(new, name)), jax.tree.leaves(getattr(state, name))):
      np.testing.assert_array_equal(a, b, err_msg=name)
  again, out = jax.jit(gan_lib.make_train_step(gan))(new, batch)
  assert int(out["nonfinite_streak"]) == 2 and int(again.nonfinite_total) == 2


def test_resume_through_orbax_continues_the_same_losses(tmp_path):
  gan = _sagan()
  step = _step(gan)
  batches = [_batch(seed=s) for s in range(4)]
  initial = _state(gan, batches[0])
  state = initial
  straight = []
  for b in batches:
    state, m = step(state, b)
    straight.append(float(m["d_loss"]))
  resumed = initial
  losses = []
  for b in batches[:2]:
    resumed, m = step(resumed, b)
    losses.append(float(m["d_loss"]))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "ckpt", resumed)
    checkpointer.wait_until_finished()
    resumed = checkpointer.restore(tmp_path / "ckpt", initial)
  for b in batches[2:]:
    resumed, m = step(resumed, b)
    losses.append(float(m["d_loss"]))
  assert losses == straight
  jax.tree.map(np.testing.assert_array_equal, resumed.ema, state.ema)


def test_one_step_is_the_same_on_1_and_8_devices():
  gan, batch = _sagan(), _batch()
  outs = []
  for n in (1, 8):
    mesh = sharding.make_mesh(jax.devices()[:n])
    replicated = sharding.replicated(mesh)
    step = jax.jit(gan_lib.make_train_step(gan, d_steps=2),
                   in_shardings=(replicated, sharding.batch_sharding(mesh)))
    state = jax.device_put(_state(gan, batch, sgd=True), replicated)
    state, metrics = step(state, {k: jax.device_put(v, sharding.batch_sharding(mesh))
                                  for k, v in batch.items()})
    outs.append((jax.device_get(state.g.params), float(metrics["g_loss"])))
  assert outs[1][1] == pytest.approx(outs[0][1], rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               outs[1][0], outs[0][0])


def _experiment(tmp_path, *args, pause_at=None):
  """experiments.sagan; with `pause_at`, SIGTERM'd when it reaches that step."""
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  command, env = [sys.executable, "-m", "experiments.sagan"], helpers.device_env(2)
  if pause_at is not None:
    command, env = helpers.paused_at("experiments.sagan", pause_at, f"{tmp_path}.paused", env)
  argv = [*command, f"--workdir={tmp_path}",
          "--config.data.image_size=32", "--config.train.steps=2", "--config.train.batch_size=4",
          "--config.model.g_ch=8", "--config.model.d_ch=8", "--config.model.z_dim=8",
          "--config.model.attention_resolution=16", "--config.train.num_samples=4",
          "--config.eval.num_images=8", "--config.eval.kid_subsets=2", *args]
  with helpers.processes_in_sessions([(argv, env)]) as started:
    ((code, out, err),) = (helpers.sigterm_when_paused(started, f"{tmp_path}.paused")
                           if pause_at is not None else helpers.finish(started))
  return subprocess.CompletedProcess(argv, code, out, err)


# The mask kind runs end to end in experiments.gan_augment's test (tests/test_gan_augment.py).
@pytest.mark.parametrize("kind", ["sagan"])
def test_experiment_end_to_end(tmp_path, kind):
  import json  # pylint: disable=g-import-not-at-top
  args = [f"--config.model.kind={kind}", "--config.model.g_channels=2,1,1"]
  # Preempted at step 1 (SIGTERM): saved there, exit 0; the rerun resumes and finishes.
  preempted = _experiment(tmp_path, *args, pause_at=1)
  assert preempted.returncode == 0, preempted.stderr[-3000:]
  assert f"preempted: saved step 1 in {tmp_path}" in preempted.stdout
  assert not (tmp_path / "summary.json").exists()
  result = _experiment(tmp_path, *args)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["kind"] == kind and summary["steps"] == 2 and summary["devices"] == 2
  assert summary["resumed_from"] == 1
  assert np.isfinite(summary["fid"]) and summary["fid_images"] == 8
  assert summary["fid_features"].startswith("random-convnet")
  assert (tmp_path / "samples.png").read_bytes()[:4] == b"\x89PNG"
  assert (tmp_path / "samples" / "step_000002.png").exists()



def test_bad_size_is_one_line(tmp_path):
  result = _experiment(tmp_path, "--config.data.image_size=48")
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == (
      "error: SAGAN generates square images of [32, 64, 128] pixels; the data gives 48x48 "
      "(set --config.data.crop_size or --config.data.image_size)"), result.stderr[-2000:]
