"""Xception (laid out as keras.applications.Xception) and the aligned Xception-65 (timm's)
through the shared model tester (tests/model_tester.py: shapes at odd sizes, Keras's and timm's
parameter counts, float32 parameters under bf16), and their own: strides and dilation at each
output stride, parameter names, DeepLab on them."""

import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

from jaxseg.backbones import get_backbone
from jaxseg.models import create_model
from tests import model_tester
from tests.model_tester import Reference


def _init(module, size):
  return jax.eval_shape(lambda: module.init_with_output(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))


# The Xceptions' widths are fixed (Keras's, timm's), so their tests would compile full-size
# networks: on 2 CPU cores ~5 s (Xception) and ~8 s (Xception-65) for the forward passes and
# ~30 s and ~60 s for a gradient step, more than the suite can give them. Their forward passes
# are checked against Keras and timm instead (tests/test_weights_keras.py,
# tests/test_weights_torch.py); here, what jax.eval_shape shows: shapes, parameter counts,
# float32 parameters under bf16.
COMPILED = None


class ShapesOnly(model_tester.BackboneTester):
  """The tester without the checks that compile the full-width network."""
  test_float32_and_bf16_outputs_are_finite_and_close = COMPILED
  test_every_parameter_gets_a_nonzero_gradient = COMPILED
  test_one_step_on_8_devices_equals_1_device = COMPILED


class TestXception(ShapesOnly):
  """The full network (its widths are Keras's, fixed) on small inputs."""

  features = {"stem": (64, 2), "stage1": (128, 4), "stage2": (256, 8), "stage3": (728, 16),
              "stage4": (2048, 32)}
  sizes = ((65, 97),)  # and 299x299 at each output stride below
  # keras.applications.Xception(include_top=False).count_params(): weights + BN moving stats.
  references = {"keras": Reference(get_backbone("xception"), 20_861_480,
                                   ("params", "batch_stats"), size=(299, 299))}

  def make(self, dtype):
    return get_backbone("xception")(dtype=dtype)

  def spatial(self, name, size):
    # Keras's two "valid" 3x3 convs (the first with stride 2), then "same" strided pools.
    size = tuple((s - 3) // 2 + 1 - 2 for s in size)
    return tuple(-(-s // (self.features[name][1] // 2)) for s in size)


class TestXception65(ShapesOnly):
  """The full network (its widths are timm's, fixed) on small inputs; the features are timm's
  taps, the inputs of each strided conv."""

  features = {"stem": (128, 2), "stage1": (256, 4), "stage2": (728, 8), "stage3": (1024, 16),
              "stage4": (2048, 32)}
  sizes = ((65, 97),)  # and 299x299 at each output stride below
  # timm xception65: 39.92M with its 1000-class classifier (2048 * 1000 + 1000).
  references = {"timm": Reference(get_backbone("xception65"), 39_916_312 - (2048 * 1000 + 1000),
                                  size=(299, 299))}

  def make(self, dtype):
    return get_backbone("xception65")(dtype=dtype)


@pytest.mark.parametrize("output_stride, last", [(32, 10), (16, 19), (8, 37)])
def test_output_stride_keeps_keras_shapes_and_dilates(output_stride, last):
  features, variables = _init(get_backbone("xception")(output_stride=output_stride), 299)
  # Keras at 299x299: 147 after block1, 74 after block2, 37, 19, 10 at the exit.
  assert features["stem"].shape == (1, 147, 147, 64)
  assert features["stage1"].shape == (1, 74, 74, 128)
  assert features["stage4"].shape == (1, last, last, 2048)
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  assert flat["block1_conv1/kernel"].shape == (3, 3, 3, 32)
  assert flat["block2_sepconv1/depthwise/kernel"].shape == (3, 3, 1, 64)
  assert flat["block2_sepconv1/pointwise/kernel"].shape == (1, 1, 64, 128)
  assert flat["conv2d_3/kernel"].shape == (1, 1, 728, 1024)  # Keras's fourth projection
  assert flat["block14_sepconv2_bn/scale"].shape == (2048,)


def test_deeplab_on_xception():
  model = create_model("deeplabv3plus", num_classes=3, backbone="xception", separable=True)
  logits, _ = _init(model, 65)
  assert logits.shape == (1, 65, 65, 3)


def test_xception65_has_65_layers_with_timm_names():
  _, variables = _init(get_backbone("xception65")(), 299)
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  convs = [k for k in flat if k.endswith("kernel") and "shortcut" not in k]
  assert len(convs) == 2 + 21 * 3 * 2  # stem + (depthwise + pointwise) x 3 per block: 65 layers
  assert flat["block0/sepconv3/depthwise/conv/kernel"].shape == (3, 3, 1, 128)
  assert flat["block19/shortcut/conv/kernel"].shape == (1, 1, 728, 1024)
  assert flat["block20/sepconv3/pointwise/bn/scale"].shape == (2048,)


@pytest.mark.parametrize("output_stride, sizes", [
    (32, (150, 75, 38, 19, 10)), (16, (150, 75, 38, 19, 19)), (8, (150, 75, 38, 38, 38))])
def test_xception65_taps_the_inputs_of_its_strided_convs(output_stride, sizes):
  features, _ = _init(get_backbone("xception65")(output_stride=output_stride), 299)
  channels = (128, 256, 728, 1024, 2048)  # timm's feature_info for xception65
  names = ("stem", "stage1", "stage2", "stage3", "stage4")
  assert {k: features[k].shape for k in names} == {
      k: (1, s, s, c) for k, s, c in zip(names, sizes, channels)}


@pytest.mark.parametrize("output_stride", [16, 8])
def test_deeplab_on_xception65(output_stride):
  model = create_model("deeplabv3plus", num_classes=4, backbone="xception65",
                       output_stride=output_stride)
  logits, variables = _init(model, 64)
  assert logits.shape == (1, 64, 64, 4)
  # The decoder's low-level input is block1's 256-channel stride-4 map, as in the paper.
  assert variables["params"]["low_level"]["conv"]["kernel"].shape == (1, 1, 256, 48)
