"""The U-Net family: parameter counts against the papers and independent formulas, any input
size, gradients reaching every parameter, attention maps, exact up-sampling, 1 vs 8 devices."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxseg import losses
from jaxseg.backbones import ResNet50
from jaxseg.layers import UpConv2x2, upsample2x_bilinear
from jaxseg.models import create_model
from jaxseg.train import build, segmentation, sharding
from jaxseg.train.checkpoint import param_shapes
from tests import helpers


def _init(model, size, channels=3):
  return jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), jnp.zeros((1, size, size, channels)), train=False))


def _count(variables, collection="params"):
  return sum(x.size for x in jax.tree.leaves(variables[collection]))


def test_unet_without_batchnorm_has_the_papers_parameter_count():
  _, variables = _init(create_model("unet", num_classes=2, batch_norm=False), 64)
  assert _count(variables) == 31_031_810


def test_batchnorm_replaces_each_conv_bias_with_scale_and_offset():
  # 18 convs in the double-conv blocks, widths 64..1024..64: + one value per channel each.
  _, variables = _init(create_model("unet", num_classes=2), 64)
  widths = [64, 128, 256, 512, 1024, 512, 256, 128, 64]
  assert _count(variables) == 31_031_810 + 2 * sum(widths)


def test_attention_gates_add_exactly_their_parameters():
  _, plain = _init(create_model("unet", num_classes=2), 64)
  _, gated = _init(create_model("attention_unet", num_classes=2), 64)
  extra = 0
  for c in (64, 128, 256, 512):  # skip width; the gate signal is 2c wide, the gate c/2
    f = c // 2
    extra += 4 * c * f + (2 * c * f + f) + (f + 1) + (c * c + 2 * c)  # theta, phi, psi, out+BN
  assert _count(gated) - _count(plain) == extra


def test_resnet50_unet_is_the_resnet50_trunk_plus_a_unet_decoder():
  _, variables = _init(create_model("resnet50_unet", num_classes=5), 64)
  _, trunk = _init(ResNet50(), 64)
  # The backbone subtree is exactly ResNet-50's, so converted weights load into it.
  assert param_shapes(variables["params"]["backbone"]) == param_shapes(trunk["params"])
  decoder = 0
  for c_in, c_out in ((2048 + 1024, 256), (256 + 512, 128), (128 + 256, 64), (64 + 64, 32),
                      (32, 16)):
    decoder += 9 * c_in * c_out + 2 * c_out + 9 * c_out * c_out + 2 * c_out
  assert _count(variables) == 23_508_032 + decoder + 9 * 16 * 5 + 5


TINY = {"unet": dict(features=4, depth=3), "attention_unet": dict(features=4, depth=3),
        "resnet50_unet": dict(backbone=helpers.register_tiny_backbone(),
                              decoder_features=(16, 8, 8, 4, 4))}


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("size", [64, 50, 33])
def test_any_input_size_gives_logits_of_that_size(name, size):
  logits, _ = _init(create_model(name, num_classes=3, **TINY[name]), size)
  assert logits.shape == (1, size, size, 3)


# The U-Nets without a backbone are checked by the 1 vs 8 devices step below (every parameter
# moves); the ResNet encoder needs its zero-initialised BN scales nudged first.
@pytest.mark.parametrize("name", ["resnet50_unet"])
def test_gradients_reach_every_parameter(name):
  model = create_model(name, num_classes=3, **TINY[name])
  images = jax.random.normal(jax.random.key(1), (2, 40, 40, 3))
  labels = jax.random.randint(jax.random.key(2), (2, 40, 40), 0, 3)
  variables = model.init(jax.random.key(0), images, train=False)
  # Nudge every parameter off its initialiser: zero-initialised BN scales (the last BN of a
  # ResNet block) would otherwise block the gradient of the conv in front of them.
  leaves, tree = jax.tree.flatten(variables["params"])
  keys = jax.random.split(jax.random.key(3), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])

  def loss(params):
    logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                            images, train=True, mutable=["batch_stats"])
    return losses.softmax_cross_entropy(logits, labels)

  grads = jax.jit(jax.grad(loss))(params)
  dead = [jax.tree_util.keystr(path) for path, g in jax.tree_util.tree_leaves_with_path(grads)
          if not np.any(np.asarray(g))]
  assert not dead


def test_attention_maps_are_returned_per_gate():
  model = create_model("attention_unet", num_classes=3, features=4, depth=3)
  images = jax.random.normal(jax.random.key(1), (2, 48, 48, 3))
  variables = model.init(jax.random.key(0), images, train=False)
  _, sown = model.apply(variables, images, train=False, mutable=["intermediates"])
  maps = {name: value["attention"][0] for name, value in sown["intermediates"].items()}
  assert {k: v.shape for k, v in maps.items()} == {
      "gate0": (2, 48, 48), "gate1": (2, 24, 24), "gate2": (2, 12, 12)}
  assert all(float(m.min()) >= 0.0 and float(m.max()) <= 1.0 for m in maps.values())


def test_upconv_equals_flax_conv_transpose():
  x = jax.random.normal(jax.random.key(0), (2, 5, 7, 6))
  ours = UpConv2x2(4)
  variables = ours.init(jax.random.key(1), x)
  reference = nn.ConvTranspose(4, (2, 2), strides=(2, 2), padding="VALID")
  kernel = variables["params"]["kernel"][::-1, ::-1]  # flax's transposed conv flips the taps
  expected = reference.apply({"params": {"kernel": kernel, "bias": variables["params"]["bias"]
                                         + 0.5}}, x)
  got = ours.apply({"params": {**variables["params"],
                               "bias": variables["params"]["bias"] + 0.5}}, x)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 1, 4, 2), (1, 16, 16, 1)])
def test_upsample2x_bilinear_equals_jax_image_resize(shape):
  x = jax.random.normal(jax.random.key(0), shape)
  expected = jax.image.resize(x, (shape[0], 2 * shape[1], 2 * shape[2], shape[3]), "bilinear",
                              antialias=False)
  np.testing.assert_allclose(upsample2x_bilinear(x), expected, rtol=1e-6, atol=1e-6)


def test_options_a_variant_does_not_have_are_refused():
  with pytest.raises(Exception, match="model.depth does not apply to model resnet50_unet"):
    create_model("resnet50_unet", num_classes=2, depth=3)
  with pytest.raises(Exception, match="model unet has no backbone"):
    create_model("unet", num_classes=2, backbone="resnet50")


def _setup(devices, name):
  # SGD without weight decay: a parameter moves exactly when its gradient is non-zero.
  config = helpers.tiny_config(**{"optim.name": "sgd", "optim.learning_rate": 0.1,
                                  "optim.weight_decay": 0.0})
  config.model = ml_collections.ConfigDict({"name": name, "dtype": "float32", **TINY[name]})
  mesh = sharding.make_mesh(devices)
  model = create_model(name, num_classes=5, **build.model_kwargs(config),
                       backbone=TINY[name].get("backbone"))
  state, state_sharding = segmentation.create_train_state(
      config, model, mesh, (32, 32, 3))
  train_step, _ = segmentation.jit_steps(config, mesh, state_sharding, 5, 255)
  return mesh, state, train_step


@pytest.mark.parametrize("name", ["attention_unet"])  # resnet50_unet: DeepLab's test covers
def test_one_step_on_8_devices_equals_1_device(name):   # its backbone; the decoder is U-Net's
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (8, 32, 32, 3)).astype(np.uint8),
           "label": rng.integers(0, 5, (8, 32, 32)).astype(np.uint8)}
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh, state, train_step = _setup(devices, name)
    initial = jax.device_get(state.params)
    state, out = train_step(state, sharding.put_batch(batch, mesh))
    results.append(jax.device_get((out["loss"], state.params, state.batch_stats)))
  # The gradient reached every parameter: every leaf moved.
  still = [jax.tree_util.keystr(p) for p, moved in jax.tree_util.tree_leaves_with_path(
      jax.tree.map(lambda a, b: bool(np.any(a != b)), results[-1][1], initial)) if not moved]
  assert not still
  (loss1, params1, stats1), (loss8, params8, stats8) = results
  np.testing.assert_allclose(loss1, loss8, rtol=1e-5)
  close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5)
  jax.tree.map(close, params1, params8)
  jax.tree.map(close, stats1, stats8)
