"""DeepLabV3+: output shapes, parameter counts from the paper's layer list, ASPP rates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.errors import JaxsegError
from jaxseg.models import create_model, deeplab
from tests import helpers


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def _bn(c):
  return 2 * c  # scale + bias (running statistics are not parameters)


def _expected_params(num_classes, separable, backbone=42_500_160, c_in=2048, low=256):
  """DeepLabV3+ head counted layer by layer from the paper (Sec. 3 and Fig. 2)."""
  f, proj = 256, 48
  conv = lambda k, i, o: k * k * i * o + _bn(o)
  sep = lambda i, o: 9 * i + _bn(i) + i * o + _bn(o)  # depthwise 3x3 + BN, pointwise + BN
  atrous = sep(c_in, f) if separable else conv(3, c_in, f)
  aspp = conv(1, c_in, f) + 3 * atrous + conv(1, c_in, f) + conv(1, 5 * f, f)
  dec1 = sep(f + proj, f) if separable else conv(3, f + proj, f)
  dec2 = sep(f, f) if separable else conv(3, f, f)
  head = conv(1, low, proj) + dec1 + dec2 + f * num_classes + num_classes
  return backbone + aspp + head


@pytest.mark.parametrize("separable", [False, True])
def test_parameter_count_resnet101(separable):
  model = create_model("deeplabv3plus", num_classes=21, backbone="resnet101",
                       separable=separable)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                                train=False))
  assert _count(variables["params"]) == _expected_params(21, separable)


@pytest.mark.parametrize("size", [(64, 64), (72, 100), (33, 47)])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_logits_have_input_size(size, output_stride):
  model = deeplab.DeepLabV3Plus(num_classes=5, backbone=helpers.TINY_RESNET,
                                output_stride=output_stride, aspp_features=16,
                                decoder_features=16, low_level_features=8)
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


def test_bf16_model_fp32_params_and_dropout_only_in_training():
  model = deeplab.DeepLabV3Plus(num_classes=4, backbone=helpers.TINY_RESNET, aspp_features=16,
                                decoder_features=16, low_level_features=8, dtype=jnp.bfloat16,
                                dropout_rate=0.5)
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
  variables = model.init(jax.random.key(1), x, train=False)
  assert {v.dtype for v in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.float32)}
  logits = model.apply(variables, x, train=False)
  assert logits.dtype == jnp.bfloat16 and np.isfinite(np.asarray(logits, np.float32)).all()
  np.testing.assert_array_equal(logits, model.apply(variables, x, train=False))
  train = lambda seed: model.apply(variables, x, train=True, mutable=["batch_stats"],
                                   rngs={"dropout": jax.random.key(seed)})[0]
  assert not np.array_equal(train(0), train(1))


def test_unknown_model_lists_choices():
  with pytest.raises(JaxsegError, match="valid choices: attention_unet, deeplabv3plus, resnet50_unet, unet"):
    create_model("deeplabv4", num_classes=3)
