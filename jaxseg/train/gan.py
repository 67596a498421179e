"""GAN training: SAGAN (noise [+ class] -> image) and the mask-to-image GAN (label map -> image).

One jitted step does `d_steps` discriminator updates and one generator update with the hinge
loss, then moves the exponential moving average of the generator's weights. Real and fake
images go through the discriminator as one concatenated batch, so its spectral-norm power
iteration runs once per update. Under jit with the batch sharded over the mesh this is data
parallel like the segmentation engine (the generator's BatchNorm statistics are global).
Optimizers follow SAGAN's two time-scale rule: Adam(beta1 = 0, beta2 = 0.9), lr_D = 4e-4,
lr_G = 1e-4 by default.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from jaxseg.train import ema as ema_lib


KINDS = ("sagan", "mask")


class ModelState(train_state.TrainState):
  """One network's parameters, optimizer state and `batch_stats` (BatchNorm and the
  spectral norms' power-iteration vectors)."""
  batch_stats: Any = None


@flax.struct.dataclass
class GANState:
  step: jax.Array
  g: ModelState
  d: ModelState
  ema: Any  # jaxseg.train.ema's average of g's params and batch_stats: what samples use
  rng: jax.Array  # raw key data, so it checkpoints like any array
  nonfinite_streak: jax.Array  # consecutive skipped steps (the shared non-finite policy)
  nonfinite_total: jax.Array  # skipped steps since the start of training


@dataclasses.dataclass(frozen=True)
class GAN:
  """A generator/discriminator pair and how each is called.

  kind "sagan": G(z, classes), D(images, classes) -> logits (B,); the condition is
  batch["class"] (absent: unconditional). kind "mask": G(label maps, z), D(images, label maps)
  -> (patch logits, features); the condition is batch["label"].
  """
  kind: str
  generator: nn.Module
  discriminator: nn.Module
  z_dim: int

  def condition(self, batch):
    return batch["label"] if self.kind == "mask" else batch.get("class")

  def generate(self, params, batch_stats, z, condition, *, train: bool):
    """(images in [-1, 1], new batch_stats)."""
    variables = {"params": params, "batch_stats": batch_stats}
    args = (condition, z) if self.kind == "mask" else (z, condition)
    if not train:
      return self.generator.apply(variables, *args, train=False), batch_stats
    images, updates = self.generator.apply(variables, *args, train=True,
                                           mutable=["batch_stats"])
    return images, updates["batch_stats"]

  def discriminate(self, params, batch_stats, images, condition, *, train: bool):
    """(float32 logits, features (mask kind; else []), new batch_stats)."""
    variables = {"params": params, "batch_stats": batch_stats}
    if train:
      out, updates = self.discriminator.apply(variables, images, condition, train=True,
                                              mutable=["batch_stats"])
      batch_stats = updates["batch_stats"]
    else:
      out = self.discriminator.apply(variables, images, condition, train=False)
    logits, features = out if self.kind == "mask" else (out, [])
    return logits, features, batch_stats


def init_state(gan: GAN, example_batch, rng, g_tx, d_tx) -> GANState:
  """Parameters from one example batch; the weight average starts at the initial generator."""
  g_rng, d_rng, z_rng, state_rng = jax.random.split(rng, 4)
  condition = gan.condition(example_batch)
  z = jax.random.normal(z_rng, (example_batch["image"].shape[0], gan.z_dim))
  args = (condition, z) if gan.kind == "mask" else (z, condition)
  # Initialised in training mode, so that the spectral norms' sigma is estimated from the
  # start (in evaluation mode flax leaves it at 1, the raw weights).
  g_vars = gan.generator.init(g_rng, *args, train=True)
  d_vars = gan.discriminator.init(d_rng, to_signed(example_batch["image"]), condition,
                                  train=True)
  g = ModelState.create(apply_fn=gan.generator.apply, params=g_vars["params"], tx=g_tx,
                        batch_stats=g_vars.get("batch_stats", {}))
  d = ModelState.create(apply_fn=gan.discriminator.apply, params=d_vars["params"], tx=d_tx,
                        batch_stats=d_vars.get("batch_stats", {}))
  return GANState(step=jnp.zeros((), jnp.int32), g=g, d=d, ema=ema_lib.init(g.params,
                                                                           g.batch_stats),
                  rng=jax.random.key_data(state_rng),
                  nonfinite_streak=jnp.zeros((), jnp.int32),
                  nonfinite_total=jnp.zeros((), jnp.int32))


def to_signed(images_uint8):
  """uint8 [0, 255] -> float32 [-1, 1], the generator's tanh range."""
  return images_uint8.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(images):
  """[-1, 1] -> uint8."""
  return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def _concat(condition):
  """The condition of a [real; fake] batch."""
  return None if condition is None else jnp.concatenate([condition, condition])


def hinge_d_loss(real_logits, fake_logits):
  return jnp.mean(nn.relu(1.0 - real_logits)) + jnp.mean(nn.relu(1.0 + fake_logits))


def make_train_step(gan: GAN, *, d_steps: int = 1, ema_decay: float = 0.999,
                    feature_matching: float = 0.0, l1: float = 0.0):
  """Returns `train_step(state, batch) -> (state, metrics)`; batch["image"] is uint8.

  The generator's loss is the hinge generator loss, -mean D(fake), plus `feature_matching`
  times pix2pixHD's L1 distance between the discriminator's features of fake and real images
  (mask kind), plus `l1` times the L1 distance to the real image (meaningful when the
  condition pins the image down, as a label map does).
  """

  def d_update(d, g, real, condition, key):
    z = jax.random.normal(key, (real.shape[0], gan.z_dim))
    # BatchNorm in training mode, as in the generator's own update; its statistics are kept
    # from that update only.
    fake, _ = gan.generate(g.params, g.batch_stats, z, condition, train=True)
    images = jnp.concatenate([real, jax.lax.stop_gradient(fake)])

    def loss_fn(params):
      logits, _, stats = gan.discriminate(params, d.batch_stats, images, _concat(condition),
                                          train=True)
      real_logits, fake_logits = jnp.split(logits, 2)
      return hinge_d_loss(real_logits, fake_logits), (stats, jnp.mean(real_logits),
                                                      jnp.mean(fake_logits))

    (loss, (stats, real_score, fake_score)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(d.params)
    d = d.apply_gradients(grads=grads).replace(batch_stats=stats)
    return d, {"d_loss": loss, "d_real": real_score, "d_fake": fake_score}

  def train_step(state, batch):
    keys = jax.random.split(jax.random.wrap_key_data(state.rng), d_steps + 2)
    real = to_signed(batch["image"])
    condition = gan.condition(batch)
    d = state.d
    for i in range(d_steps):
      d, d_metrics = d_update(d, state.g, real, condition, keys[i])
    z = jax.random.normal(keys[d_steps], (real.shape[0], gan.z_dim))

    def g_loss_fn(params):
      fake, stats = gan.generate(params, state.g.batch_stats, z, condition, train=True)
      logits, features, _ = gan.discriminate(d.params, d.batch_stats,
                                             jnp.concatenate([real, fake]), _concat(condition),
                                             train=False)
      adversarial = -jnp.mean(jnp.split(logits, 2)[1])
      terms = {"g_adversarial": adversarial}
      if feature_matching:
        pairs = [jnp.split(f, 2) for f in features]
        terms["g_feature_matching"] = sum(
            jnp.mean(jnp.abs(f - jax.lax.stop_gradient(r))) for r, f in pairs) / len(pairs)
      if l1:
        terms["g_l1"] = jnp.mean(jnp.abs(fake - real))
      total = (adversarial + feature_matching * terms.get("g_feature_matching", 0.0)
               + l1 * terms.get("g_l1", 0.0))
      return total, (stats, terms)

    (g_loss, (stats, terms)), grads = jax.value_and_grad(g_loss_fn, has_aux=True)(
        state.g.params)
    g = state.g.apply_gradients(grads=grads).replace(batch_stats=stats)
    # The weight average every task shares (TF's warm-up; t = updates applied so far).
    ema = ema_lib.update(state.ema, g.params, g.batch_stats, ema_decay,
                         state.step - state.nonfinite_total)
    out = {**d_metrics, "g_loss": g_loss, **terms}
    # The shared non-finite policy: a step whose losses or new weights (both networks, their
    # statistics, the EMA) are not all finite changes nothing but the step and the counters.
    ok = jnp.all(jnp.stack([jnp.isfinite(v) for v in jax.tree.leaves(out)] + [
        jnp.isfinite(optax.tree.norm(t)) for t in (g.params, g.batch_stats, d.params,
                                                    d.batch_stats, ema)]))
    new = state.replace(g=g, d=d, ema=ema, rng=jax.random.key_data(keys[-1]))
    state = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state).replace(
        step=state.step + 1,
        nonfinite_streak=jnp.where(ok, 0, state.nonfinite_streak + 1),
        nonfinite_total=state.nonfinite_total + (~ok).astype(jnp.int32))
    return state, {**out, "finite": ok, "nonfinite_streak": state.nonfinite_streak}

  return train_step


def make_sample(gan: GAN):
  """Returns `sample(state, z, condition) -> uint8 images` from the EMA generator."""

  def sample(state, z, condition):
    images, _ = gan.generate(state.ema["params"], state.ema["batch_stats"], z, condition,
                             train=False)
    return to_uint8(images)

  return sample


def make_optimizers(g_lr: float = 1e-4, d_lr: float = 4e-4, b1: float = 0.0, b2: float = 0.9):
  """SAGAN's two time-scale Adam pair (generator, discriminator)."""
  return optax.adam(g_lr, b1=b1, b2=b2), optax.adam(d_lr, b1=b1, b2=b2)


def dominant_class(labels, num_classes: int, background: int | None = None):
  """The most frequent class of each label map (B, H, W), `background` and ignored pixels
  not counted: what a class-conditional SAGAN is conditioned on when trained on crops."""
  counts = jnp.sum(jax.nn.one_hot(labels.astype(jnp.int32), num_classes), axis=(1, 2))
  if background is not None:
    counts = counts.at[:, background].set(-1)
  return jnp.argmax(counts, -1).astype(jnp.int32)
