"""Optimizers: DeepLab's poly schedule with warm-up, decay mask, clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxseg.errors import JaxsegError
from jaxseg.train import optim


def test_poly_schedule_with_warmup_matches_formula():
  lr, total, warmup, power = 0.01, 100, 10, 0.9
  schedule = optim.make_schedule("poly", lr, total, warmup_steps=warmup, power=power)
  for t in range(warmup):
    np.testing.assert_allclose(schedule(t), lr / (warmup + 1) + (lr - lr / (warmup + 1)) * t / warmup,
                               rtol=1e-6)
  for t in range(warmup, total + 1, 7):
    np.testing.assert_allclose(schedule(t), lr * (1 - (t - warmup) / (total - warmup)) ** power,
                               rtol=1e-5, atol=1e-9)
  assert float(schedule(total)) == 0.0


def test_cosine_and_constant():
  cosine = optim.make_schedule("cosine", 1.0, 10, end_factor=0.1)
  np.testing.assert_allclose([cosine(0), cosine(5), cosine(10)], [1.0, 0.55, 0.1], rtol=1e-6)
  assert float(optim.make_schedule("constant", 0.3, 10)(7)) == pytest.approx(0.3)
  with pytest.raises(JaxsegError, match="valid choices: poly, cosine, constant"):
    optim.make_schedule("step", 0.1, 10)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_weight_decay_only_on_kernels(name):
  params = {"conv": {"kernel": jnp.ones((3, 3, 2, 2))}, "bn": {"scale": jnp.ones(2),
                                                               "bias": jnp.ones(2)},
            "classifier": {"kernel": jnp.ones((1, 1, 2, 3)), "bias": jnp.ones(3)}}
  tx = optim.make_optimizer(name, optax.constant_schedule(0.1), weight_decay=0.5)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert float(jnp.abs(updates["conv"]["kernel"]).min()) > 0
  assert float(jnp.abs(updates["classifier"]["kernel"]).min()) > 0
  for leaf in (updates["bn"]["scale"], updates["bn"]["bias"], updates["classifier"]["bias"]):
    np.testing.assert_array_equal(leaf, 0.0)


def test_global_norm_clipping():
  params = {"w": jnp.zeros(4)}
  tx = optim.make_optimizer("sgd", optax.constant_schedule(1.0), momentum=0.0, clip_norm=1.0)
  grads = {"w": jnp.array([3.0, 4.0, 0.0, 0.0])}  # norm 5
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], [-0.6, -0.8, 0.0, 0.0], rtol=1e-6)


def test_unknown_optimizer_lists_choices():
  with pytest.raises(JaxsegError, match="valid choices: sgd, adamw"):
    optim.make_optimizer("lamb", optax.constant_schedule(0.1))


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_backbone_multiplier_and_freeze(name):
  params = {"backbone": {"w": jnp.ones((2, 2))}, "head": {"w": jnp.ones((2, 2))}}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  plain = optim.make_optimizer(name, optax.constant_schedule(0.1), momentum=0.0)
  scaled = optim.make_optimizer(name, optax.constant_schedule(0.1), momentum=0.0,
                                backbone_multiplier=0.1, freeze_backbone_steps=2)
  plain_state, scaled_state = plain.init(params), scaled.init(params)
  for step in range(4):
    u_plain, plain_state = plain.update(grads, plain_state, params)
    u_scaled, scaled_state = scaled.update(grads, scaled_state, params)
    np.testing.assert_array_equal(u_scaled["head"]["w"], u_plain["head"]["w"])
    factor = 0.0 if step < 2 else 0.1  # held still for 2 updates, then a 10x lower rate
    np.testing.assert_allclose(u_scaled["backbone"]["w"], factor * u_plain["backbone"]["w"],
                               rtol=1e-6)
    assert np.abs(u_plain["backbone"]["w"]).min() > 0
