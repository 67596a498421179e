"""The ResNet trunk through the shared model tester (tests/model_tester.py: shapes at odd
sizes, torchvision's and Keras's parameter counts, bf16, gradients, 1 vs 8 devices), and what is
the ResNet's own: output stride by dilation, stable parameter names, the two styles."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

from jaxseg import layers
from jaxseg.backbones import BACKBONES, get_backbone, resnet
from jaxseg.errors import JaxsegError
from tests import helpers, model_tester
from tests.model_tester import Reference


def _variables(module, size=64):
  return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                            train=False))


class TestResNet(model_tester.BackboneTester):
  """The tiny ResNet (one block per stage, width 8) through the shared model tester."""

  features = {"stem": (8, 2), "stage1": (32, 4), "stage2": (64, 8), "stage3": (128, 16),
              "stage4": (256, 32)}
  sizes = ((65, 97), (64, 96), (33, 47))
  references = {
      # torchvision resnet50 / resnet101 parameters() without fc.weight / fc.bias.
      "resnet50": Reference(get_backbone("resnet50"), 23_508_032),
      "resnet101": Reference(get_backbone("resnet101"), 42_500_160),
      # keras.applications.ResNet50/101(include_top=False).count_params(): weights, biases and
      # BN moving statistics; that is torchvision's count + one bias per conv + the BN
      # statistics.
      "keras_resnet50": Reference(lambda: resnet.ResNet50(style="keras"), 23_587_712,
                                  ("params", "batch_stats")),
      "keras_resnet101": Reference(lambda: resnet.ResNet101(style="keras"), 42_658_176,
                                   ("params", "batch_stats"))}

  def make(self, dtype):
    return helpers.TINY_RESNET(dtype=dtype)


@pytest.mark.parametrize("output_stride, reductions", [
    (32, (4, 8, 16, 32)), (16, (4, 8, 16, 16)), (8, (4, 8, 8, 8))])
def test_output_stride_turns_strides_into_dilation(output_stride, reductions):
  module = resnet.ResNet50(output_stride=output_stride)
  features = jax.eval_shape(lambda: module.init_with_output(
      jax.random.key(0), jnp.zeros((2, 64, 96, 3)), train=False))[0]
  assert features["stem"].shape == (2, 32, 48, 64)
  for s, r in enumerate(reductions):
    assert features[f"stage{s + 1}"].shape == (2, 64 // r, 96 // r, 256 * 2**s)
  assert {k: v[1] for k, v in resnet.feature_info((3, 4, 6, 3), output_stride).items()} == {
      "stem": 2, **{f"stage{s + 1}": r for s, r in enumerate(reductions)}}


def test_dilation_does_not_change_parameters():
  shapes = [jax.tree.map(lambda x: x.shape, _variables(resnet.ResNet50(output_stride=o)))
            for o in (8, 16, 32)]
  assert shapes[0] == shapes[1] == shapes[2]


def test_stage_plan_dilations_and_multi_grid():
  plan = resnet.stage_plan((3, 4, 23, 3), 8)
  assert [p[0] for p in plan] == [1, 2, 1, 1]
  assert plan[2][1] == (1,) + (2,) * 22  # first block keeps the previous dilation (torchvision)
  assert plan[3][1] == (2, 4, 4)
  # DeepLabV3 Sec. 3.2: multi-grid (1, 2, 4) at output stride 16 gives rates 2 * (1, 2, 4).
  assert resnet.stage_plan((3, 4, 6, 3), 16, (1, 2, 4))[3][1] == (2, 4, 8)
  with pytest.raises(ValueError, match="one rate per block"):
    resnet.stage_plan((3, 4, 6, 3), 16, (1, 2))
  with pytest.raises(ValueError, match="8, 16 or 32"):
    resnet.stage_plan((3, 4, 6, 3), 4)


@pytest.mark.parametrize("output_stride, expected", [
    (32, {1: 16}), (16, {1: 14, 2: 2}), (8, {1: 8, 2: 6, 4: 2})])
def test_dilated_convs_in_the_compiled_graph(output_stride, expected):
  # The 3x3 convs per dilation in the traced ResNet-50 (16 in all); the first block of a newly
  # dilated stage keeps the previous dilation, as torchvision does.
  module = resnet.ResNet50(output_stride=output_stride)
  x = jnp.zeros((1, 64, 64, 3))
  variables = _variables(module)
  jaxpr = jax.make_jaxpr(lambda v: module.apply(v, x, train=False))(variables)
  seen = {}
  for eqn in jaxpr.jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated" and eqn.invars[1].aval.shape[0] == 3:
      d = eqn.params["rhs_dilation"][0]
      seen[d] = seen.get(d, 0) + 1
  assert seen == expected


def test_parameter_names_are_the_documented_contract():
  flat = traverse_util.flatten_dict(_variables(resnet.ResNet50())["params"], sep="/")
  for path, shape in {
      "stem/conv/kernel": (7, 7, 3, 64), "stem/bn/scale": (64,),
      "stage1/block0/conv1/conv/kernel": (1, 1, 64, 64),
      "stage1/block0/downsample/conv/kernel": (1, 1, 64, 256),
      "stage2/block0/conv2/conv/kernel": (3, 3, 128, 128),
      "stage4/block2/conv3/bn/bias": (2048,)}.items():
    assert flat[path].shape == shape, path
  assert "stage2/block1/downsample/conv/kernel" not in flat
  assert len([p for p in flat if p.startswith("stage3/block") and p.endswith("conv1/conv/kernel")]) == 6


def test_unknown_backbone_lists_choices():
  # Other tests may have registered their tiny backbone: the message lists the live registry.
  with pytest.raises(JaxsegError) as error:
    get_backbone("resnet18")
  assert f"valid choices: {', '.join(sorted(BACKBONES))}" in str(error.value)
  assert {"resnet50", "resnet101", "xception"} <= set(BACKBONES)


@pytest.mark.parametrize("style, strided", [("torchvision", {(7, 7), (3, 3), (1, 1)}),
                                           ("keras", {(7, 7), (1, 1)})])
def test_style_decides_which_conv_strides(style, strided):
  # Kernel sizes of the stride-2 convs: the stem, the projection shortcut (1x1) and the
  # bottleneck conv that strides: the 3x3 in torchvision's v1.5, the first 1x1 in Keras's v1.
  # (1x1 convs run as matrix products, so this watches the conv modules' in/out sizes.)
  module = resnet.ResNet(stage_sizes=(1, 1, 1, 1), width=8, style=style)
  x = jnp.zeros((1, 32, 32, 3))
  kernels = set()

  def record(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and isinstance(
        context.module, (nn.Conv, layers.PointwiseConv)) and args[0].shape[1] == 2 * y.shape[1]:
      kernels.add(tuple(context.module.variables["params"]["kernel"].shape[:2]))
    return y

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: module.init(jax.random.key(0), x, train=False))
  assert kernels == strided
