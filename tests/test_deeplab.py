"""DeepLabV3+ through the shared model tester (tests/model_tester.py: shapes at odd sizes,
parameter counts from the paper's layer list, bf16, gradients, 1 vs 8 devices), and what is
DeepLab's own: logits at output stride 8, ASPP rates, dropout only in training."""

import jax
import jax.numpy as jnp
import pytest

from jaxseg.errors import JaxsegError
from jaxseg.models import create_model, deeplab
from tests import helpers, model_tester
from tests.model_tester import Reference

SIZES = ((65, 97), (72, 100), (33, 47), (64, 64))


def _bn(c):
  return 2 * c  # scale + bias (running statistics are not parameters)


def _expected_params(num_classes, separable, backbone=42_500_160, c_in=2048, low=256):
  """DeepLabV3+ head counted layer by layer from the paper (Sec. 3 and Fig. 2); the backbone
  is torchvision's ResNet-101 without its classifier."""
  f, proj = 256, 48
  conv = lambda k, i, o: k * k * i * o + _bn(o)
  sep = lambda i, o: 9 * i + _bn(i) + i * o + _bn(o)  # depthwise 3x3 + BN, pointwise + BN
  atrous = sep(c_in, f) if separable else conv(3, c_in, f)
  aspp = conv(1, c_in, f) + 3 * atrous + conv(1, c_in, f) + conv(1, 5 * f, f)
  dec1 = sep(f + proj, f) if separable else conv(3, f + proj, f)
  dec2 = sep(f, f) if separable else conv(3, f, f)
  head = conv(1, low, proj) + dec1 + dec2 + f * num_classes + num_classes
  return backbone + aspp + head


def _resnet101_deeplab(separable):
  return lambda: create_model("deeplabv3plus", num_classes=21, backbone="resnet101",
                              separable=separable)


class TestDeepLabV3Plus(model_tester.SegmentationModelTester):
  name, sizes = "deeplabv3plus", SIZES  # output stride 16
  kwargs = dict(backbone=helpers.register_tiny_backbone(), aspp_features=16,
                decoder_features=16, low_level_features=8)
  references = {"resnet101": Reference(_resnet101_deeplab(False), _expected_params(21, False)),
                "resnet101_separable": Reference(_resnet101_deeplab(True),
                                                 _expected_params(21, True))}

  def test_dropout_only_in_training(self, variables):
    # Traced, not run: the evaluation pass draws no random numbers, the training pass does
    # (dropout is DeepLab's only randomness).
    model = self.make(jnp.float32)
    x = jnp.zeros((2, 32, 32, 3))

    def draws(train):
      jaxpr = jax.make_jaxpr(lambda v, key: model.apply(
          v, x, train=train, mutable=["batch_stats"], rngs={"dropout": key}))(
              variables, jax.random.key(0))
      return "random_bits" in str(jaxpr)

    assert not draws(False) and draws(True)


@pytest.mark.parametrize("size", SIZES[:3])
def test_logits_have_input_size_at_output_stride_8(size):
  model = deeplab.DeepLabV3Plus(num_classes=5, backbone=helpers.TINY_RESNET, output_stride=8,
                                aspp_features=16, decoder_features=16, low_level_features=8)
  x = jnp.ones((2, *size, 3))
  logits, _ = jax.eval_shape(lambda: model.init_with_output(
      {"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, train=True))
  assert logits.shape == (2, *size, 5)


@pytest.mark.parametrize("output_stride, rates", [(16, [6, 12, 18]), (8, [12, 24, 36])])
def test_aspp_rates_follow_output_stride(output_stride, rates):
  # The atrous rates actually used by the traced graph (the tiny backbone only dilates by 2).
  model = deeplab.DeepLabV3Plus(num_classes=3, backbone=helpers.TINY_RESNET,
                                output_stride=output_stride, aspp_features=8,
                                decoder_features=8, low_level_features=8)
  x = jnp.zeros((1, 64, 64, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(variables)
  used = sorted({e.params["rhs_dilation"][0] for e in jaxpr.jaxpr.eqns
                 if e.primitive.name == "conv_general_dilated"} - {1, 2})
  assert used == rates == list(deeplab.ASPP_RATES[output_stride])


def test_unknown_model_lists_choices():
  with pytest.raises(JaxsegError, match="valid choices: attention_unet, deeplabv3plus, resnet50_unet, unet"):
    create_model("deeplabv4", num_classes=3)
