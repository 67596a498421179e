"""SAGAN's generator and discriminator and the mask-to-image pair through the shared model
tester (tests/model_tester.py: shapes, the reference's parameter counts, bf16, gradients, 1 vs 8
devices), and their own: the class-conditional tables, spectral norm, the attention block, the
label map steering the image."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.models import mask_gan, sagan
from tests import model_tester
from tests.model_tester import Reference

CLASSES = 5
Z_DIM = 16


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


# brain-research/self-attention-gan, ImageNet 128x128: z 128, ch 64, 1000 classes. Counted layer
# by layer from its code (no published figure); SN's u vectors are not parameters.
def _generator_128():
  return sagan.Generator(resolution=128, num_classes=1000)


def _discriminator_128():
  return sagan.Discriminator(resolution=128, num_classes=1000)


def _latent_128():
  return jnp.zeros((2, 128)), jnp.zeros((2,), jnp.int32)


def _images_128():
  return jnp.zeros((2, 128, 128, 3)), jnp.zeros((2,), jnp.int32)


class ImageGenerator(model_tester.ModelTester):
  """A generator's contract: an image of the asked size in [-1, 1] (tanh), trained here
  towards a random target image."""

  def loss(self, outputs, example):
    return jnp.mean(jnp.square(outputs - example["target"]))

  def expected_shapes(self, batch, size):
    return (batch, *size, 3)

  def check_outputs(self, outputs):
    assert float(np.abs(outputs).max()) <= 1


class TestGenerator(ImageGenerator):
  """z (B, 16) and a class -> a 16x16 image (two blocks, attention at 8x8); the output size is
  the model's resolution."""

  sizes, step_size = ((16, 16),), (16, 16)
  output_dtype = jnp.float32  # the generator ends with tanh in float32
  references = {"reference_128": Reference(_generator_128, 42_078_852, inputs=_latent_128)}

  def make(self, dtype):
    return sagan.Generator(resolution=16, num_classes=CLASSES, ch=4, channels=(2, 2),
                           attention_resolution=8, dtype=dtype)

  def example(self, batch, size, rng):
    return {"z": rng.standard_normal((batch, Z_DIM)).astype(np.float32),
            "class": rng.integers(0, CLASSES, (batch,)).astype(np.int32),
            "target": rng.uniform(-1, 1, (batch, *size, 3)).astype(np.float32)}

  def inputs(self, example):
    return example["z"], example["class"]



class TestDiscriminator(model_tester.ModelTester):
  """A 16x16 image and its class -> one float32 logit (a projection discriminator; two
  blocks, attention at 8x8)."""

  sizes, step_size = ((16, 16),), (16, 16)
  output_dtype = jnp.float32  # the head runs in float32 on purpose (sagan.Discriminator)
  references = {"reference_128": Reference(_discriminator_128, 39_463_618, inputs=_images_128)}

  def make(self, dtype):
    return sagan.Discriminator(resolution=16, num_classes=CLASSES, ch=8, channels=(1, 2),
                               attention_resolution=8, dtype=dtype)

  def example(self, batch, size, rng):
    return {"image": rng.uniform(-1, 1, (batch, *size, 3)).astype(np.float32),
            "class": rng.integers(0, CLASSES, (batch,)).astype(np.int32),
            "real": rng.choice([-1.0, 1.0], batch).astype(np.float32)}

  def inputs(self, example):
    return example["image"], example["class"]

  def loss(self, outputs, example):
    return jnp.mean(jax.nn.softplus(-example["real"] * outputs))  # logistic real/fake loss

  def expected_shapes(self, batch, size):
    return (batch,)


class TestMaskToImageGenerator(ImageGenerator):
  """A label map (with ignored pixels) and z -> an image of the map's size (multiples of 4)."""

  sizes = ((16, 24), (18, 26))  # multiples of 2 (two blocks); attention at height 8 in the first
  step_size = (16, 24)
  output_dtype = jnp.float32  # ends with tanh in float32, as SAGAN's generator
  test_parameter_count = None  # no published figure for this SPADE / PatchGAN combination

  def make(self, dtype):
    return mask_gan.MaskToImageGenerator(num_classes=3, ch=4, channels=(2, 1), z_dim=8,
                                         attention_resolution=8, dtype=dtype)

  def example(self, batch, size, rng):
    labels = rng.integers(0, 3, (batch, *size)).astype(np.int32)
    labels[:, :4, :4] = 255
    return {"label": labels, "z": rng.standard_normal((batch, 8)).astype(np.float32),
            "target": rng.uniform(-1, 1, (batch, *size, 3)).astype(np.float32)}

  def inputs(self, example):
    return example["label"], example["z"]


  def test_the_label_map_steers_the_image(self, variables):
    model = self.make(jnp.float32)
    labels = jnp.zeros((2, 16, 24), jnp.int32).at[:, :, 12:].set(2).at[1, :4, :4].set(255)
    z = jax.random.normal(jax.random.key(0), (2, 8))
    generate = jax.jit(lambda labels: model.apply(variables, labels, z, train=False))
    assert not np.allclose(generate(labels), generate(labels.at[:, :, 12:].set(1)))
    assert "attention" in variables["params"]


class TestPatchDiscriminator(model_tester.ModelTester):
  """An image and its label map -> float32 patch logits (B, H/8, W/8) and the features of each
  layer (for feature matching)."""

  sizes = ((32, 48), (65, 97))  # attention at height 8 in the first; "SAME" padding rounds up
  step_size = (32, 48)
  output_dtype = jnp.float32  # logits and features are cast for the float32 losses
  test_parameter_count = None  # no published figure for this SPADE / PatchGAN combination

  def make(self, dtype):
    return mask_gan.PatchDiscriminator(num_classes=3, ch=4, attention_resolution=8, dtype=dtype)

  def example(self, batch, size, rng):
    labels = rng.integers(0, 3, (batch, *size)).astype(np.int32)
    labels[:, :4, :4] = 255
    return {"image": rng.uniform(-1, 1, (batch, *size, 3)).astype(np.float32),
            "label": labels, "real": rng.choice([-1.0, 1.0], batch).astype(np.float32)}

  def inputs(self, example):
    return example["image"], example["label"]

  def loss(self, outputs, example):
    logits, _ = outputs
    return jnp.mean(jax.nn.softplus(-example["real"][:, None, None] * logits))

  def expected_shapes(self, batch, size):
    up = lambda s, r: -(-s // r)
    h, w = size
    features = [(batch, up(h, r), up(w, r), c) for r, c in ((2, 4), (4, 8), (8, 16), (8, 32))]
    return (batch, up(h, 8), up(w, 8)), features

  def test_attention_runs_in_the_discriminator(self, variables):
    assert "attention" in variables["params"]


def test_reference_tables_and_attention_at_128():
  # The class-conditional BatchNorm tables: 2 x 1000 x C per CBN; the attention blocks.
  g_vars = jax.eval_shape(lambda: _generator_128().init(jax.random.key(0), *_latent_128(),
                                                        train=False))
  d_vars = jax.eval_shape(lambda: _discriminator_128().init(jax.random.key(0), *_images_128(),
                                                            train=False))
  tables = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(g_vars["params"])
               if "cbn" in jax.tree_util.keystr(p))
  assert tables == 9_856_000
  assert _count(g_vars["params"]["attention"]) == 81_921
  assert _count(d_vars["params"]["attention"]) == 20_481


@pytest.mark.parametrize("num_classes", [0, CLASSES])
def test_only_a_conditional_discriminator_has_class_embeddings(num_classes):
  g = sagan.Generator(resolution=32, num_classes=num_classes, ch=8, attention_resolution=16)
  d = sagan.Discriminator(resolution=32, num_classes=num_classes, ch=8,
                          attention_resolution=16)
  z, y = jnp.zeros((3, Z_DIM)), jnp.array([0, 1, 2])
  images, _ = jax.eval_shape(lambda: g.init_with_output(jax.random.key(1), z, y, train=False))
  logits, d_vars = jax.eval_shape(lambda images: d.init_with_output(
      jax.random.key(2), images, y, train=False), images)
  assert images.shape == (3, 32, 32, 3)
  assert logits.shape == (3,) and logits.dtype == jnp.float32
  assert ("embed" in d_vars["params"]) == bool(num_classes)


def test_attention_is_the_identity_at_gamma_zero_and_its_rows_are_distributions():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 32))
  block = sagan.SelfAttention2D()

  @jax.jit  # one program: op by op takes 3x longer
  def run(x):
    variables = block.init(jax.random.key(1), x, train=False)
    out, sown = block.apply(variables, x, train=False, mutable=["intermediates"])
    # With gamma != 0 the block mixes positions.
    params = {**variables["params"], "gamma": jnp.asarray(0.5)}
    mixed = block.apply({**variables, "params": params}, x, train=False)
    return variables["params"]["gamma"], out, sown["intermediates"]["attention"][0], mixed

  gamma, out, attention, mixed = run(x)
  assert float(gamma) == 0.0
  np.testing.assert_array_equal(out, x)
  assert attention.shape == (2, 64, 16)  # keys and values max-pooled 2x2
  np.testing.assert_allclose(attention.sum(-1), 1.0, rtol=1e-5)
  assert not np.allclose(mixed, x)


def test_spectral_norm_keeps_the_largest_singular_value_near_one_after_updates():
  layer = sagan.SNConv(16, 3)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 8))
  variables = layer.init(jax.random.key(1), x, train=True)
  params = variables["params"]
  stats = variables["batch_stats"]
  key = jax.random.key(2)
  for _ in range(30):  # parameter updates, each followed by a training call (power step)
    key, sub = jax.random.split(key)
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(sub, p.shape), params)
    _, updates = layer.apply({"params": params, "batch_stats": stats}, x, train=True,
                             mutable=["batch_stats"])
    stats = updates["batch_stats"]
  kernel = params["Conv_0"]["kernel"]
  sigma = stats["sn"]["Conv_0/kernel/sigma"]  # what the layer divides the kernel by
  largest = np.linalg.svd(np.asarray(kernel).reshape(-1, 16), compute_uv=False)[0]
  assert largest / float(sigma) == pytest.approx(1.0, abs=0.05)
  assert largest > 1.5  # the raw kernel is far from norm 1: the normalisation does the work


def test_one_hot_labels_give_ignored_pixels_a_channel_of_their_own():
  labels = jnp.zeros((2, 32, 48), jnp.int32).at[:, :, 24:].set(2).at[1, :4, :4].set(255)
  onehot = mask_gan.one_hot_labels(labels, 3)
  assert onehot.shape == (2, 32, 48, 4) and float(onehot[1, 0, 0, 3]) == 1.0
