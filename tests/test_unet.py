"""The U-Net family through the shared model tester (tests/model_tester.py: shapes at any
input size, parameter counts against the paper and independent formulas, bf16, gradients,
1 vs 8 devices), and what is the U-Net's own: the backbone subtree, attention maps, exact
up-sampling, options a variant does not have."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.backbones import ResNet50
from jaxseg.layers import UpConv2x2, upsample2x_bilinear
from jaxseg.models import create_model
from jaxseg.train.checkpoint import param_shapes
from tests import helpers, model_tester
from tests.model_tester import Reference

# Depth 2 pads inputs to multiples of 4 and crops the logits back: odd sizes take that path.
SIZES = ((65, 97), (50, 50), (33, 33))
TINY = dict(features=4, depth=2)


def _init(model, size, channels=3):
  return jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), jnp.zeros((1, size, size, channels)), train=False))


# The paper's U-Net (Ronneberger et al. 2015, Fig. 1): conv biases, no BatchNorm, 2 classes.
PAPER = 31_031_810
# Widths of the 9 double-conv blocks, 64..1024..64 (18 convs).
WIDTHS = [64, 128, 256, 512, 1024, 512, 256, 128, 64]
# BatchNorm replaces each of those convs' bias with a scale and an offset: + one value per
# channel each.
WITH_BATCHNORM = PAPER + 2 * sum(WIDTHS)


def _attention_gates():
  """Oktay et al. 2018, Fig. 2, per gate on a skip of width c (gate signal 2c, gate c/2)."""
  extra = 0
  for c in (64, 128, 256, 512):
    f = c // 2
    extra += 4 * c * f + (2 * c * f + f) + (f + 1) + (c * c + 2 * c)  # theta, phi, psi, out+BN
  return extra


def _resnet50_unet_decoder(num_classes):
  """Five levels of two 3x3 conv + BN (input: the upsampled level + the skip) and a 3x3 head."""
  decoder = 0
  for c_in, c_out in ((2048 + 1024, 256), (256 + 512, 128), (128 + 256, 64), (64 + 64, 32),
                      (32, 16)):
    decoder += 9 * c_in * c_out + 2 * c_out + 9 * c_out * c_out + 2 * c_out
  return decoder + 9 * 16 * num_classes + num_classes


class TestUNet(model_tester.SegmentationModelTester):
  name, kwargs, sizes = "unet", TINY, SIZES
  references = {
      "paper": Reference(lambda: create_model("unet", num_classes=2, batch_norm=False), PAPER),
      "batch_norm": Reference(lambda: create_model("unet", num_classes=2), WITH_BATCHNORM)}


class TestAttentionUNet(model_tester.SegmentationModelTester):
  name, kwargs, sizes = "attention_unet", TINY, SIZES
  # The gates add exactly their parameters to the U-Net with BatchNorm.
  references = {"paper": Reference(lambda: create_model("attention_unet", num_classes=2),
                                   WITH_BATCHNORM + _attention_gates())}

  def test_attention_maps_are_returned_per_gate(self, variables):
    model = self.make(jnp.float32)
    images = jax.random.normal(jax.random.key(1), (2, 48, 48, 3))

    @jax.jit
    def attention_maps(variables, images):
      _, sown = model.apply(variables, images, train=False, mutable=["intermediates"])
      return {name: value["attention"][0] for name, value in sown["intermediates"].items()}

    maps = attention_maps(variables, images)
    assert {k: v.shape for k, v in maps.items()} == {"gate0": (2, 48, 48), "gate1": (2, 24, 24)}
    assert all(float(m.min()) >= 0.0 and float(m.max()) <= 1.0 for m in maps.values())


class TestResNet50UNet(model_tester.SegmentationModelTester):
  name, sizes = "resnet50_unet", SIZES
  kwargs = dict(backbone=helpers.register_tiny_backbone(), decoder_features=(16, 8, 8, 4, 4))
  # torchvision's ResNet-50 without its classifier, plus the decoder.
  references = {"resnet50": Reference(lambda: create_model("resnet50_unet", num_classes=5),
                                      23_508_032 + _resnet50_unet_decoder(5))}


def test_resnet50_unet_backbone_is_the_resnet50_trunk():
  _, variables = _init(create_model("resnet50_unet", num_classes=5), 64)
  _, trunk = _init(ResNet50(), 64)
  # The backbone subtree is exactly ResNet-50's, so converted weights load into it.
  assert param_shapes(variables["params"]["backbone"]) == param_shapes(trunk["params"])


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
