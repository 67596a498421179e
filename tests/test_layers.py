"""Fast re-implementations of standard ops against the plain XLA op they replace: the same
values and gradients (float32 rounding), so a model's results do not depend on which runs."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg import layers


def _grouped_conv(x, kernel, strides, dilation, padding):
  return jax.lax.conv_general_dilated(
      x, kernel, (strides, strides), [(padding, padding)] * 2, rhs_dilation=(dilation,) * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


@pytest.mark.parametrize("shape,k,strides,dilation,padding", [
    ((2, 9, 11, 6), 3, 1, 1, 1),
    ((2, 9, 11, 6), 3, 2, 1, 1),   # Xception's strided separable convs
    ((2, 8, 8, 5), 3, 1, 6, 6),    # ASPP rates: most taps read padding
    ((1, 4, 4, 3), 3, 1, 12, 12),  # wider than the map: only the centre tap is left
    ((2, 10, 7, 4), 5, 2, 2, 3),
    ((2, 6, 6, 4), 3, 1, 1, 0),
])
def test_depthwise_conv_equals_grouped_conv_with_gradients(shape, k, strides, dilation,
                                                           padding):
  x = jax.random.normal(jax.random.key(0), shape)
  kernel = jax.random.normal(jax.random.key(1), (k, k, 1, shape[-1]))
  cotangent = jax.random.normal(jax.random.key(2), _grouped_conv(
      x, kernel, strides, dilation, padding).shape)

  def loss(fn):
    return jax.value_and_grad(lambda x, w: jnp.sum(fn(x, w, strides, dilation, padding) *
                                                   cotangent), argnums=(0, 1))(x, kernel)

  (want, want_grads), (got, got_grads) = loss(_grouped_conv), loss(layers.depthwise_conv)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)


def test_conv_bn_act_keeps_nn_conv_parameters_for_depthwise_convs():
  # Converted weights and old checkpoints name and shape the kernel as nn.Conv did.
  x = jnp.ones((1, 8, 8, 4))
  variables = layers.ConvBNAct(4, groups=4, dilation=2).init(jax.random.key(0), x, train=False)
  assert jax.tree.map(jnp.shape, variables["params"]["conv"]) == {"kernel": (3, 3, 1, 4)}
  plain = jax.lax.conv_general_dilated(
      x, variables["params"]["conv"]["kernel"], (1, 1), [(2, 2)] * 2, rhs_dilation=(2, 2),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=4)
  conv = layers.DepthwiseConv(3, dilation=2, padding=2).apply(
      {"params": variables["params"]["conv"]}, x)
  np.testing.assert_allclose(conv, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("strides,padding,use_bias,dtype", [
    (1, "SAME", True, None), (2, "SAME", False, None), (2, "VALID", False, None),
    (1, [(0, 0), (0, 0)], True, jnp.bfloat16)])
def test_pointwise_conv_is_nn_conv_with_gradients(strides, padding, use_bias, dtype):
  """`layers.conv` makes plain 1x1 convs `PointwiseConv` (a matrix product): the same
  parameters (names, shapes, initial values) and, to rounding, the same values and gradients
  as the nn.Conv it replaces, strided ones included (odd map sizes)."""
  x = jax.random.normal(jax.random.key(0), (2, 7, 9, 5))
  kw = dict(use_bias=use_bias, dtype=dtype)
  ours = layers.conv(6, (1, 1), strides, padding, **kw)
  plain = nn.Conv(6, (1, 1), strides, padding, **kw)
  assert isinstance(ours, layers.PointwiseConv)
  params = plain.init(jax.random.key(1), x)["params"]
  chex.assert_trees_all_equal(ours.init(jax.random.key(1), x)["params"], params)
  if use_bias:  # a non-zero bias, so that its gradient and its place both show
    params = {**params, "bias": jnp.arange(6.0)}
  cotangent = jax.random.normal(jax.random.key(2), plain.apply({"params": params}, x).shape)

  def run(module):
    return jax.value_and_grad(lambda p, x: jnp.sum(
        module.apply({"params": p}, x).astype(jnp.float32) * cotangent), (0, 1))(params, x)

  tol = dict(rtol=2e-2, atol=5e-2) if dtype else dict(rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(run(ours), run(plain), **tol)


@pytest.mark.parametrize("size,dilation,strides,cropped", [
    (4, 12, 1, True),   # ASPP rate 12 past a 4x4 map: only the centre tap is left
    (16, 18, 1, True),  # rate 18 at output stride 16 on a 256 px input
    (16, 12, 1, False),  # every tap reads some pixel: nothing to leave out
    (5, 6, 2, True),    # strided
])
def test_dilated_conv_is_nn_conv_with_gradients(size, dilation, strides, cropped):
  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  pad = dilation
  plain = nn.Conv(5, (3, 3), strides, [(pad, pad)] * 2, kernel_dilation=dilation,
                  use_bias=True, kernel_init=layers.conv_kernel_init)
  ours = layers.DilatedConv(5, 3, strides, dilation, pad, use_bias=True,
                            kernel_init=layers.conv_kernel_init)
  params = plain.init(jax.random.key(1), x)["params"]
  chex.assert_trees_all_equal(ours.init(jax.random.key(1), x)["params"], params)
  params = {**params, "bias": jnp.arange(5.0)}
  cotangent = jax.random.normal(jax.random.key(2), plain.apply({"params": params}, x).shape)

  def run(module):
    return jax.value_and_grad(lambda p, x: jnp.sum(module.apply({"params": p}, x) * cotangent),
                              (0, 1))(params, x)

  chex.assert_trees_all_close(run(ours), run(plain), rtol=1e-5, atol=1e-5)
  jaxpr = jax.make_jaxpr(lambda x: ours.apply({"params": params}, x))(x)
  kernel_hw = [e.invars[1].aval.shape[:2] for e in jaxpr.jaxpr.eqns
               if e.primitive.name == "conv_general_dilated"]
  assert (kernel_hw[0] != (3, 3)) == cropped


def test_conv_keeps_nn_conv_where_a_1x1_has_more_to_it():
  assert isinstance(layers.conv(4, (3, 3)), nn.Conv)
  assert isinstance(layers.conv(4, (1, 1), padding=[(1, 1), (1, 1)]), nn.Conv)
  assert isinstance(layers.conv(4, (1, 1), feature_group_count=2), nn.Conv)
  assert isinstance(layers.conv(4, (1, 1), input_dilation=2), nn.Conv)
  assert layers.conv(4, (1, 1), kernel_dilation=3, name="pw").name == "pw"


@pytest.mark.parametrize("shape,size", [
    ((2, 5, 7, 3), (10, 14)),   # U-Net's 2x
    ((2, 4, 4, 3), (16, 16)),   # DeepLab's decoder and head, x4
    ((1, 3, 5, 2), (9, 40)),    # other factors per axis
    ((2, 1, 1, 4), (6, 6)),     # the image-pooling branch
])
def test_upsample_bilinear_equals_jax_image_resize_with_gradients(shape, size):
  x = jax.random.normal(jax.random.key(0), shape)
  cotangent = jax.random.normal(jax.random.key(1), (shape[0], *size, shape[-1]))

  def loss(fn):
    return jax.value_and_grad(lambda x: jnp.sum(fn(x) * cotangent))(x)

  want, want_grad = loss(lambda x: jax.image.resize(x, (shape[0], *size, shape[-1]),
                                                    "bilinear", antialias=False))
  got, got_grad = loss(lambda x: layers.resize_bilinear(x, size))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-5)
