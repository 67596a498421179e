"""SAGAN: reference parameter counts, spectral norm, the attention block, shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.models import sagan


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def test_parameter_counts_equal_the_reference_at_128():
  # brain-research/self-attention-gan, ImageNet 128x128: z 128, ch 64, 1000 classes. Counted
  # layer by layer from its code (no published figure); SN's u vectors are not parameters.
  z, y = jnp.zeros((2, 128)), jnp.zeros((2,), jnp.int32)
  g = sagan.Generator(resolution=128, num_classes=1000)
  d = sagan.Discriminator(resolution=128, num_classes=1000)
  g_vars = jax.eval_shape(lambda: g.init(jax.random.key(0), z, y, train=False))
  d_vars = jax.eval_shape(lambda: d.init(jax.random.key(0), jnp.zeros((2, 128, 128, 3)), y,
                                         train=False))
  assert _count(g_vars["params"]) == 42_078_852
  assert _count(d_vars["params"]) == 39_463_618
  # The class-conditional BatchNorm tables: 2 x 1000 x C per CBN.
  tables = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(g_vars["params"])
               if "cbn" in jax.tree_util.keystr(p))
  assert tables == 9_856_000
  assert _count(g_vars["params"]["attention"]) == 81_921
  assert _count(d_vars["params"]["attention"]) == 20_481


@pytest.mark.parametrize("num_classes", [0, 5])
def test_shapes_at_32(num_classes):
  g = sagan.Generator(resolution=32, num_classes=num_classes, ch=8, attention_resolution=16)
  d = sagan.Discriminator(resolution=32, num_classes=num_classes, ch=8,
                          attention_resolution=16)
  z, y = jax.random.normal(jax.random.key(0), (3, 16)), jnp.array([0, 1, 2])
  g_vars = g.init(jax.random.key(1), z, y, train=False)
  images = g.apply(g_vars, z, y, train=False)
  assert images.shape == (3, 32, 32, 3) and float(jnp.abs(images).max()) <= 1
  d_vars = d.init(jax.random.key(2), images, y, train=False)
  logits = d.apply(d_vars, images, y, train=False)
  assert logits.shape == (3,) and logits.dtype == jnp.float32
  assert ("embed" in d_vars["params"]) == bool(num_classes)


def test_attention_is_the_identity_at_gamma_zero_and_its_rows_are_distributions():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 32))
  block = sagan.SelfAttention2D()
  variables = block.init(jax.random.key(1), x, train=False)
  assert float(variables["params"]["gamma"]) == 0.0
  out, sown = block.apply(variables, x, train=False, mutable=["intermediates"])
  np.testing.assert_array_equal(out, x)
  attention = sown["intermediates"]["attention"][0]
  assert attention.shape == (2, 64, 16)  # keys and values max-pooled 2x2
  np.testing.assert_allclose(attention.sum(-1), 1.0, rtol=1e-5)
  # With gamma != 0 the block mixes positions.
  params = {**variables["params"], "gamma": jnp.asarray(0.5)}
  assert not np.allclose(block.apply({**variables, "params": params}, x, train=False), x)


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


def test_mask_to_image_shapes_and_the_label_map_steers_the_image():
  from jaxseg.models import mask_gan  # pylint: disable=g-import-not-at-top
  labels = jnp.zeros((2, 32, 48), jnp.int32).at[:, :, 24:].set(2).at[1, :4, :4].set(255)
  z = jax.random.normal(jax.random.key(0), (2, 8))
  g = mask_gan.MaskToImageGenerator(num_classes=3, ch=4, channels=(4, 2, 1), z_dim=8,
                                    attention_resolution=16)
  g_vars = g.init(jax.random.key(1), labels, z, train=False)
  images = g.apply(g_vars, labels, z, train=False)
  assert images.shape == (2, 32, 48, 3)
  other = g.apply(g_vars, labels.at[:, :, 24:].set(1), z, train=False)
  assert not np.allclose(images, other)
  d = mask_gan.PatchDiscriminator(num_classes=3, ch=4, attention_resolution=8)
  d_vars = d.init(jax.random.key(2), images, labels, train=False)
  logits, features = d.apply(d_vars, images, labels, train=False)
  assert logits.shape == (2, 4, 6) and len(features) == 4  # SAME padding: H/8 x W/8
  assert "attention" in d_vars["params"] and "attention" in g_vars["params"]
  onehot = mask_gan.one_hot_labels(labels, 3)
  assert onehot.shape == (2, 32, 48, 4) and float(onehot[1, 0, 0, 3]) == 1.0
