"""Inputs that are not 8-bit RGB: pretrained RGB first convolutions adapted by
segmentation_models_pytorch's rule (checked against smp itself), the pictures `as_rgb` makes of
any band count and dtype, and augmentation that keeps each image's dtype, bands and values."""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxseg import visualize, weights
from jaxseg.data import transforms
from jaxseg.errors import JaxsegError
from jaxseg.train import build, segmentation, sharding
from jaxseg.train.checkpoint import param_shapes
from jaxseg.weights import store
from tests import helpers

CHANNELS = (1, 2, 4, 5, 8)


def _kernel(seed=0, shape=(7, 7, 3, 8)):
  """A random HWIO kernel (float32, as converted checkpoints store them)."""
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _conv(images, kernel):
  """NHWC images through an HWIO kernel, 'SAME' padding, as flax's nn.Conv computes it."""
  return jax.lax.conv_general_dilated(jnp.asarray(images), jnp.asarray(kernel), (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


# --- adapt_first_conv: smp's patch_first_conv -------------------------------------------------


@pytest.fixture(scope="module")
def smp_patched():
  """(RGB kernel, {C: smp's patched kernel for C inputs}), all HWIO: a Conv2d(3, 8, 7) with
  random weights in a small nn.Sequential, copied and patched once per channel count."""
  torch = pytest.importorskip("torch")
  from tests import torch_reference  # pylint: disable=g-import-not-at-top
  torch_reference.import_smp()  # smp imports torchvision, which needs import_smp's care
  # pylint: disable-next=g-import-not-at-top
  from segmentation_models_pytorch.encoders._utils import patch_first_conv
  torch.manual_seed(0)
  # A later conv, as in a real encoder, which smp must leave alone.
  model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 7), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3))
  rgb = model[0].weight.detach().numpy().transpose(2, 3, 1, 0)  # OIHW -> HWIO
  patched = {}
  for c in CHANNELS:
    copied = copy.deepcopy(model)
    patch_first_conv(copied, new_in_channels=c, pretrained=True)
    assert copied[2].weight.shape == (8, 8, 3, 3)  # smp left the later conv alone
    patched[c] = copied[0].weight.detach().numpy().transpose(2, 3, 1, 0)
  return rgb, patched


@pytest.mark.parametrize("channels", CHANNELS)
def test_adapt_first_conv_matches_smp(smp_patched, channels):
  rgb, patched = smp_patched
  ours = weights.adapt_first_conv(rgb, channels)
  assert ours.shape == (7, 7, channels, 8) and ours.dtype == np.float32
  # Same float32 operations in the same order: no tolerance is needed (the max error is 0).
  np.testing.assert_array_equal(ours, patched[channels])


@pytest.mark.parametrize("channels", CHANNELS + (3,))
def test_adapt_first_conv_formula(channels):
  """The rule itself, written out, so that a change in smp cannot silently redefine it."""
  kernel = _kernel()
  ours = weights.adapt_first_conv(kernel, channels)
  if channels == 3:
    expected = kernel  # an RGB model keeps its filters
  elif channels == 1:
    expected = kernel[:, :, 0:1] + kernel[:, :, 1:2] + kernel[:, :, 2:3]
  else:  # band i takes RGB filter i % 3; 3/C keeps the summed response's scale
    expected = np.stack([kernel[:, :, i % 3] for i in range(channels)], axis=2) * (3 / channels)
  np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(7, 7, 4, 8), (7, 7, 1, 8), (7, 7, 8)])
def test_adapt_first_conv_refuses_a_kernel_that_is_not_rgb(shape):
  with pytest.raises(JaxsegError, match="does not take 3 channels"):
    weights.adapt_first_conv(np.zeros(shape, np.float32), 4)


@pytest.mark.parametrize("channels", [1, 6])
def test_grey_image_gets_the_response_the_rgb_network_gave_it(channels):
  """Why the rule makes sense: a grey image given as C identical bands through the adapted
  kernel gives what its RGB version (3 identical bands) gave the pretrained kernel. Exact for
  C = 1 (the sum) and for multiples of 3 (each RGB filter C/3 times, scaled by 3/C)."""
  kernel = _kernel(seed=1)
  grey = np.random.default_rng(2).uniform(0, 1, (2, 12, 12, 1)).astype(np.float32)
  rgb_response = _conv(np.repeat(grey, 3, axis=-1), kernel)
  adapted_response = _conv(np.repeat(grey, channels, axis=-1),
                           weights.adapt_first_conv(kernel, channels))
  np.testing.assert_allclose(adapted_response, rgb_response, rtol=1e-4, atol=1e-4)


# --- adapt_input_channels: which kernels of a pretrained tree are adapted ---------------------


def _backbone(stem_in=3, stem_out=8):
  """A pretrained-like tree: an RGB stem conv and a later conv (values random, numpy)."""
  return {"stem": {"conv": {"kernel": _kernel(0, (7, 7, stem_in, stem_out))},
                   "bn": {"scale": np.ones(stem_out, np.float32)}},
          "stage1": {"conv": {"kernel": _kernel(1, (3, 3, 8, 8))}}}


def _model_shapes(stem_in, stem_out=8):
  """The "/"-joined shapes of a model with a `stem_in`-channel stem, as create_train_state
  computes them (from the model's abstract params)."""
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          _backbone(stem_in, stem_out))
  return param_shapes({"backbone": abstract})


@pytest.mark.parametrize("channels", [1, 4])
def test_adapt_input_channels_adapts_only_the_rgb_stem(channels):
  pretrained = {"backbone": _backbone()}
  adapted, paths = weights.adapt_input_channels(pretrained, _model_shapes(channels))
  assert paths == ["backbone/stem/conv/kernel"]
  np.testing.assert_array_equal(adapted["backbone"]["stem"]["conv"]["kernel"],
                                weights.adapt_first_conv(_kernel(0), channels))
  # Everything else as it was, and the input tree is not modified.
  np.testing.assert_array_equal(adapted["backbone"]["stage1"]["conv"]["kernel"],
                                _kernel(1, (3, 3, 8, 8)))
  np.testing.assert_array_equal(adapted["backbone"]["stem"]["bn"]["scale"], np.ones(8))
  assert pretrained["backbone"]["stem"]["conv"]["kernel"].shape == (7, 7, 3, 8)
  # The adapted tree has the model's shapes, so check_pretrained's shape check passes.
  assert param_shapes(adapted) == _model_shapes(channels)


@pytest.mark.parametrize("model_shapes", [
    _model_shapes(3),  # an RGB model: nothing to do
    _model_shapes(4, stem_out=16),  # another width too: left for check_pretrained to report
    {},  # paths the model does not have: likewise
], ids=["rgb", "other_width", "absent"])
def test_adapt_input_channels_leaves_what_it_cannot_adapt(model_shapes):
  pretrained = {"backbone": _backbone()}
  adapted, paths = weights.adapt_input_channels(pretrained, model_shapes)
  assert paths == []
  assert jax.tree.all(jax.tree.map(np.array_equal, adapted, pretrained))


# --- end to end: an RGB pretrained backbone in a 4-band model ---------------------------------


def _save_rgb_backbone(directory):
  """A pretrained checkpoint of the tiny test ResNet (RGB stem), random values; the shapes
  come from eval_shape, so nothing is compiled."""
  module = helpers.TINY_RESNET()
  shapes = jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda x: rng.uniform(0.5, 1.5, x.shape).astype(np.float32), shapes)
  store.save_pretrained(str(directory), variables, {
      "source": "torch", "arch": "tiny", "backbone": helpers.register_tiny_backbone(),
      "backbone_kwargs": {}, "preprocessing": weights.PREPROCESSING["torch"],
      "preprocessing_name": "torch", "input_file": "tiny.pth", "input_sha256": "0" * 64})


def test_four_band_model_starts_from_rgb_pretrained_backbone(tmp_path):
  """What train_and_evaluate does with --config.model.pretrained, for 4-band images: the RGB
  stem is adapted in create_train_state's check, then insert_pretrained puts it in the state."""
  _save_rgb_backbone(tmp_path / "pretrained")
  config = helpers.tiny_config(steps=1)
  config.model.pretrained = str(tmp_path / "pretrained")
  pretrained, meta = build.load_pretrained_backbone(config)
  rgb_stem = pretrained["params"]["stem"]["conv"]["kernel"].copy()
  stage1 = pretrained["params"]["stage1"]["block0"]["conv1"]["conv"]["kernel"].copy()
  model = build.segmentation_model(config, 5, meta)
  image_shape = (32, 32, 4)

  # Without the adaptation the RGB stem is a shape mismatch: the adaptation is what loads it.
  abstract = jax.eval_shape(build.segmentation_init(config, model, image_shape),
                            jax.random.key(0))
  with pytest.raises(JaxsegError, match=r"stem/conv/kernel has shape \(7, 7, 3, 8\) in the "
                                        r"checkpoint but \(7, 7, 4, 8\) in the model"):
    build.check_pretrained(abstract, pretrained, config.model.pretrained)

  mesh = sharding.make_mesh()
  state, state_sharding = segmentation.create_train_state(config, model, mesh, image_shape,
                                                          pretrained)
  state = build.insert_pretrained(state, pretrained, state_sharding)
  backbone = jax.device_get(state.params["backbone"])
  np.testing.assert_array_equal(backbone["stem"]["conv"]["kernel"],
                                weights.adapt_first_conv(rgb_stem, 4))
  np.testing.assert_array_equal(backbone["stage1"]["block0"]["conv1"]["conv"]["kernel"], stage1)


# --- as_rgb: a picture of any image --------------------------------------------------------------


def test_as_rgb_returns_uint8_rgb_unchanged():
  images = np.random.default_rng(0).integers(0, 256, (2, 6, 5, 3), dtype=np.uint8)
  out = visualize.as_rgb(images)
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, images)


@pytest.mark.parametrize("bands", [None, (2,)])
def test_as_rgb_shows_one_band_in_grey(bands):
  """One band (by default the first of a non-RGB image) on all three colours."""
  images = np.random.default_rng(0).integers(0, 256, (2, 6, 5, 4), dtype=np.uint8)
  band = 0 if bands is None else bands[0]
  out = visualize.as_rgb(images[..., :1] if bands is None else images, bands)
  assert out.shape == (2, 6, 5, 3) and out.dtype == np.uint8
  for colour in range(3):
    np.testing.assert_array_equal(out[..., colour], images[..., band])


def test_as_rgb_band_triple_selects_and_orders_bands():
  images = np.random.default_rng(0).integers(0, 256, (2, 6, 5, 4), dtype=np.uint8)
  np.testing.assert_array_equal(visualize.as_rgb(images, (2, 1, 0)), images[..., [2, 1, 0]])


RAMP = np.arange(100, dtype=np.float64).reshape(10, 10)  # 2nd percentile 1.98, 98th 97.02


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_as_rgb_stretches_each_image_and_band_between_percentiles(dtype):
  """Each image and band is the same ramp at another gain and offset; stretched per image and
  band, all of them become the same picture: 0 below the 2nd percentile, 255 above the 98th."""
  gains = {np.uint16: [[1, 40, 600], [7, 3, 200]], np.float32: [[1e-3, 1, 50], [0.5, 2, 1e4]]}
  offsets = {np.uint16: [[0, 1000, 100], [3000, 7, 0]], np.float32: [[-1, 0, 3], [0.25, -7, 9]]}
  gain = np.array(gains[dtype], np.float64)[:, None, None, :]
  offset = np.array(offsets[dtype], np.float64)[:, None, None, :]
  images = (RAMP[None, :, :, None] * gain + offset).astype(dtype)
  out = visualize.as_rgb(images, (0, 1, 2))
  assert out.shape == images.shape and out.dtype == np.uint8
  expected = np.clip(np.round((RAMP - 1.98) / (97.02 - 1.98) * 255), 0, 255)
  # Exact today; 1 grey level of slack for float32 percentile arithmetic at a .5 rounding.
  for n in range(2):
    for band in range(3):
      np.testing.assert_allclose(out[n, ..., band], expected, atol=1)
  flat = out[..., 0].reshape(2, -1)
  assert np.all(flat[:, :2] == 0) and np.all(flat[:, 98:] == 255)  # clipped tails
  assert np.all(np.diff(flat.astype(int), axis=1) >= 0)  # order kept
  assert abs(int(flat[0, 50]) - 130) <= 1  # linear between: (50 - 1.98) / 95.04 * 255


def test_as_rgb_of_a_flat_band_does_not_divide_by_zero():
  """A band with one value (high == low) gives zeros, not NaN cast to uint8."""
  images = np.full((1, 4, 4, 1), 1234, np.uint16)
  np.testing.assert_array_equal(visualize.as_rgb(images), 0)


@pytest.mark.parametrize("bands", [(4,), (0, 1), (-1,), (0, 1, 4)])
def test_as_rgb_refuses_bad_bands_naming_the_flag(bands):
  images = np.zeros((1, 4, 4, 4), np.uint16)
  with pytest.raises(ValueError, match="--config.data.display_bands"):
    visualize.as_rgb(images, bands)


# --- transforms: dtype, bands and values kept --------------------------------------------------


def _image(dtype, channels, shape=(16, 20), seed=0):
  """A random image of the dtype's typical range: full 16 bits, floats around 0."""
  rng = np.random.default_rng(seed)
  if dtype == np.float32:
    return rng.normal(size=shape + (channels,)).astype(np.float32)
  return rng.integers(0, np.iinfo(dtype).max + 1, shape + (channels,)).astype(dtype)


def _pil_float_resize(band, size, box):
  return np.asarray(Image.fromarray(np.asarray(band, np.float32), "F")
                    .resize(size, Image.BILINEAR, box=box))


BOX = (1.5, 0.5, 19.0, 15.25)  # a window of a 16x20 image, not on pixel edges


@pytest.mark.parametrize("dtype, channels", [(np.uint16, 4), (np.float32, 1)])
def test_resize_image_keeps_dtype_bands_and_values(dtype, channels):
  image = _image(dtype, channels)
  out = transforms.resize_image(image, (9, 7), BOX)
  assert out.shape == (7, 9, channels) and out.dtype == dtype
  # Each band is PIL's float resize; integers rounded (not truncated) back to their dtype.
  floats = np.stack([_pil_float_resize(image[..., c], (9, 7), BOX) for c in range(channels)], -1)
  if dtype == np.float32:
    np.testing.assert_array_equal(out, floats)
  else:
    np.testing.assert_array_equal(out, np.round(floats))


def test_resize_image_keeps_16_bit_extremes():
  """Flat 0 and 65535 bands stay exactly 0 and 65535: clipped, not wrapped around."""
  image = np.stack([np.zeros((16, 20), np.uint16), np.full((16, 20), 65535, np.uint16)], -1)
  out = transforms.resize_image(image, (9, 7), BOX)
  np.testing.assert_array_equal(out[..., 0], 0)
  np.testing.assert_array_equal(out[..., 1], 65535)


@pytest.mark.parametrize("box", [(0, 0, 20, 16), BOX])
def test_resize_image_of_8_bit_rgb_is_pils(box):
  image = _image(np.uint8, 3)
  expected = np.asarray(Image.fromarray(image).resize((9, 7), Image.BILINEAR, box=box))
  np.testing.assert_array_equal(transforms.resize_image(image, (9, 7), box), expected)


@pytest.mark.parametrize("dtype, channels", [(np.uint16, 4), (np.float32, 3), (np.uint8, 1),
                                             (np.uint8, 3)])
def test_scale_crop_at_scale_one_returns_the_image(dtype, channels):
  image = _image(dtype, channels)
  label = np.random.default_rng(1).integers(0, 5, (16, 20)).astype(np.uint8)
  out_image, out_label = transforms.scale_crop(image, label, 1.0, (16, 20), (0.5, 0.5), 255)
  assert out_image.dtype == dtype
  np.testing.assert_array_equal(out_image, image)
  np.testing.assert_array_equal(out_label, label)


def _augment(example, seed):
  """Augment with no geometry (scale 1, crop = image, no flip): only the jitter is left."""
  augment = transforms.Augment(crop_size=example["label"].shape, min_scale=1.0, max_scale=1.0,
                               flip=False)
  return augment.random_map(example, np.random.default_rng(seed))


@pytest.mark.parametrize("dtype, channels", [(np.uint16, 4), (np.uint8, 4), (np.uint8, 1),
                                             (np.float32, 3)])
@pytest.mark.parametrize("seed", range(4))
def test_augment_does_not_jitter_images_that_are_not_8_bit_rgb(dtype, channels, seed):
  example = {"image": _image(dtype, channels), "label": np.zeros((16, 20), np.uint8)}
  out = _augment(example, seed)
  assert out["image"].dtype == dtype
  np.testing.assert_array_equal(out["image"], example["image"])


def test_augment_jitters_8_bit_rgb():
  """The control for the test above: with the same geometry, RGB photographs do change (the
  jitter draws each of its four parts with probability 1/2, so most seeds change something)."""
  example = {"image": _image(np.uint8, 3), "label": np.zeros((16, 20), np.uint8)}
  changed = [not np.array_equal(_augment(example, seed)["image"], example["image"])
             for seed in range(8)]
  assert sum(changed) >= 4  # each seed leaves the image alone with probability 1/16


def test_pad_to_keeps_dtype_and_bands():
  image = _image(np.uint16, 4, shape=(10, 12))
  label = np.ones((10, 12), np.uint8)
  out = transforms.PadTo((16, 16)).map({"image": image, "label": label})
  assert out["image"].shape == (16, 16, 4) and out["image"].dtype == np.uint16
  np.testing.assert_array_equal(out["image"][:10, :12], image)
  assert not out["image"][10:].any() and not out["image"][:, 12:].any()
  assert np.all(out["label"][10:] == 255) and np.all(out["label"][:, 12:] == 255)
