"""The GAN task: `train_and_evaluate(config, workdir)` for both GAN kinds, on the shared
skeleton (jaxseg.train.loop: workdir, resume, cadence, non-finite policy, timing, summary).

Data comes through the segmentation pipeline (grain, crops, checkpointed position), so a GAN
trains on any registered dataset. Every `train.sample_every` steps the EMA generator draws a
fixed set of samples into `WORKDIR/samples/step_N.png` (and `samples.png`, the latest); at the
end FID and KID against real val images are written to summary.json, with the name of the
feature network they come from.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg import image_quality, visualize
from jaxseg.data import pipeline
from jaxseg.data.files import channels
from jaxseg.data.from_config import make_data
from jaxseg.errors import JaxsegError
from jaxseg.train import build, loop, sharding
from jaxseg.train import gan as gan_lib
from jaxseg.train.checkpoint import Checkpointer, param_shapes, restore_latest_state, workdir_path


def _center_crop(array, size):
  h, w = array.shape[:2]
  y, x = (h - size[0]) // 2, (w - size[1]) // 2
  if y < 0 or x < 0:
    raise JaxsegError(f"val images of {h}x{w} are smaller than the training crop {size}")
  return array[y:y + size[0], x:x + size[1]]


def real_examples(source, n: int, size) -> dict[str, np.ndarray]:
  """The first `n` examples of `source`, centre-cropped to the training size."""
  examples = [source[i] for i in range(min(n, len(source)))]
  return {"image": np.stack([_center_crop(e["image"], size) for e in examples]),
          "label": np.stack([_center_crop(e["label"], size) for e in examples]).astype(np.int32)}


@dataclasses.dataclass
class _Setup:
  """What training and restoring a GAN both build from the config."""
  mesh: Any
  data: Any
  gan: gan_lib.GAN
  prepare: Any  # batch -> the step's batch (int32 labels; the class for conditional SAGAN)
  state: gan_lib.GANState  # freshly initialised
  state_sharding: Any
  background: int | None
  conditional: bool
  size: tuple[int, int]

  def identity(self, config):
    return {"model": f"gan_{self.gan.kind}", "backbone": None,
            "num_classes": self.data.train.num_classes,
            "params": param_shapes({"generator": self.state.g.params,
                                    "discriminator": self.state.d.params}),
            "train_data": repr(self.data.train), "global_batch_size": config.train.batch_size}


def _setup(config, workdir: str) -> _Setup:
  mesh = sharding.make_mesh()
  local_batch = sharding.check_batch_size(config.train.batch_size, mesh)
  data = make_data(config, workdir, local_batch)
  if channels(data.train) != (3, np.uint8):
    raise JaxsegError(f"the GANs draw 8-bit RGB images; {data.train!r} has "
                      f"{channels(data.train)[0]}-channel {channels(data.train)[1].name} ones")
  num_classes = data.train.num_classes
  gan = build.gan(config, num_classes, data.image_shape)
  background = config.model.background_class
  if background is None:
    background = 0 if data.train.class_names[0] == "background" else None
  elif not 0 <= background < num_classes:
    background = None  # -1: every class is a condition
  conditional = gan.kind == "mask" or config.model.conditional

  def prepare(batch):
    batch = {"image": batch["image"], "label": batch["label"].astype(jnp.int32)}
    if gan.kind == "sagan" and config.model.conditional:
      batch["class"] = gan_lib.dominant_class(batch["label"], num_classes, background)
    return batch

  g_tx, d_tx = build.gan_optimizers(config)
  h, w = data.image_shape[:2]
  example = prepare({"image": jnp.zeros((1, h, w, 3), jnp.uint8),
                     "label": jnp.zeros((1, h, w), jnp.int32)})
  init = lambda rng: gan_lib.init_state(gan, example, rng, g_tx, d_tx)
  state, state_sharding = build.materialize(init, config.train.seed, mesh)
  return _Setup(mesh, data, gan, prepare, state, state_sharding, background, conditional, (h, w))


@dataclasses.dataclass
class Generator:
  """A trained mask-to-image GAN's EMA generator, restored from its workdir."""
  gan: gan_lib.GAN
  state: gan_lib.GANState
  workdir: str
  step: int
  image_size: tuple[int, int]
  batch_size: int

  def __post_init__(self):
    self._sample = jax.jit(gan_lib.make_sample(self.gan))

  def draw(self, labels: np.ndarray, keys) -> np.ndarray:
    """uint8 images (N, H, W, 3) for label maps (N, H, W); pair i's noise comes from keys[i],
    so a pair does not depend on the others drawn with it. Padded to `batch_size`: one
    compilation for every call."""
    n = len(labels)
    if n > self.batch_size:
      raise ValueError(f"at most {self.batch_size} label maps per call; got {n}")
    z = jax.vmap(lambda k: jax.random.normal(k, (self.gan.z_dim,)))(jnp.stack(keys))
    pad = self.batch_size - n
    labels = np.concatenate([labels, np.repeat(labels[:1], pad, 0)]).astype(np.int32)
    z = jnp.concatenate([z, jnp.repeat(z[:1], pad, 0)])
    return np.asarray(self._sample(self.state, z, jnp.asarray(labels)))[:n]


def restore_generator(config, workdir: str) -> Generator:
  """The mask GAN of `workdir` (trained with `config`) at its latest checkpoint."""
  workdir = workdir_path(workdir)
  setup = _setup(config, workdir)
  if setup.gan.kind != "mask":
    raise JaxsegError(f"{workdir}: a {setup.gan.kind} GAN draws no image for a label map")
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), setup.identity(config),
                      async_save=False)
  try:
    if ckpt.latest_step() is None:
      raise JaxsegError(f"{ckpt.directory}: no checkpoint to draw pairs with")
    state, step = restore_latest_state(ckpt, setup.state)
  finally:
    ckpt.close()
  return Generator(setup.gan, state, workdir, step, setup.size, config.train.batch_size)


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains (resuming from `workdir`), samples, scores FID/KID, writes summary.json."""
  build.validate(config)
  with loop.Run(workdir, config, build.loop_settings(config), purpose="GAN training") as run:
    os.makedirs(run.path("samples"), exist_ok=True)
    setup = _setup(config, run.workdir)
    mesh, data, gan, state = setup.mesh, setup.data, setup.gan, setup.state
    num_classes, background = data.train.num_classes, setup.background
    (h, w), state_sharding = setup.size, setup.state_sharding
    step_fn = gan_lib.make_train_step(gan, d_steps=config.train.d_steps,
                                      ema_decay=config.train.ema_decay,
                                      feature_matching=config.train.feature_matching,
                                      l1=config.train.l1)
    train_step = jax.jit(lambda s, b: step_fn(s, setup.prepare(b)),
                         in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                         out_shardings=(state_sharding, sharding.replicated(mesh)),
                         donate_argnums=0)
    sample = jax.jit(gan_lib.make_sample(gan))

    # Fixed samples: the first val label maps (mask kind), or fixed z with classes in turn.
    shown = real_examples(data.val, config.train.num_samples, (h, w))
    n_samples = len(shown["image"])
    z_fixed = jax.random.normal(jax.random.key(config.train.seed + 1), (n_samples, gan.z_dim))
    if gan.kind == "mask":
      c_fixed = jnp.asarray(shown["label"])
    elif config.model.conditional:
      classes = [k for k in range(num_classes) if k != background]
      c_fixed = jnp.asarray([classes[i % len(classes)] for i in range(n_samples)], jnp.int32)
    else:
      c_fixed = None

    def write_samples(state, step):
      if jax.process_index() != 0:
        return
      images = np.asarray(sample(state, z_fixed, c_fixed))
      if gan.kind == "mask":  # each cell: the label map beside its generated image
        labels = visualize.colorize(shown["label"], data.train.palette, data.train.ignore_index)
        images = np.concatenate([labels, images], axis=2)
      columns = 4 if gan.kind == "mask" else 8
      visualize.tile(run.path("samples", f"step_{step:06d}.png"), images, columns=columns)
      visualize.tile(run.path("samples.png"), images, columns=columns)

    data_iter = pipeline.Prefetch(iter(data.loader), lambda b: sharding.put_batch(b, mesh),
                                 size=config.data.prefetch)
    try:
      state = run.resume(state, setup.identity(config), data_iterator=data_iter,
                         sampler=data.loader.global_sampler)
      state = run.train(state, train_step, lambda step: next(data_iter), samples=write_samples,
                        data_iterator=data_iter, loss_key="d_loss")
    finally:
      data_iter.close()
    if run.start >= config.train.steps:  # a finished run, run again: no sample was drawn
      write_samples(state, int(state.step))
    with run.chrono.pause():
      scores = score(state, gan, sample, data.val, config, (h, w), num_classes, background)
    result = run.write_summary(state, {
        **scores, "kind": gan.kind, "conditional": bool(setup.conditional),
        "dataset": config.data.name, "image_size": [h, w],
        "num_params_generator": int(sum(x.size for x in jax.tree.leaves(state.g.params))),
        "num_params_discriminator": int(sum(x.size for x in jax.tree.leaves(state.d.params))),
    }, mesh)
  return result


def score(state, gan, sample, val, config, size, num_classes, background) -> dict[str, Any]:
  """FID and KID of EMA-generator samples against real val crops (same conditions)."""
  real = real_examples(val, config.eval.num_images, size)
  n = len(real["image"])
  z = jax.random.normal(jax.random.key(config.train.seed + 2), (n, gan.z_dim))
  if gan.kind == "mask":
    conditions = jnp.asarray(real["label"])
  elif config.model.conditional:
    conditions = gan_lib.dominant_class(jnp.asarray(real["label"]), num_classes, background)
  else:
    conditions = None
  batch = config.train.batch_size
  fake = np.concatenate([
      np.asarray(sample(state, z[i:i + batch],
                        None if conditions is None else conditions[i:i + batch]))
      for i in range(0, n, batch)])
  features = image_quality.feature_network(config.eval.features)
  real_f, fake_f = features(real["image"]), features(fake)
  # Subsets of half the images (1000 at most, as usual): with all n in each, every subset
  # would be the same and the spread 0.
  kid_mean, kid_std = image_quality.kid(real_f, fake_f, subsets=config.eval.kid_subsets,
                                        subset_size=max(2, min(1000, n // 2)))
  return {"fid": image_quality.fid(real_f, fake_f), "kid": kid_mean, "kid_std": kid_std,
          "fid_images": n, "fid_features": features.name}
