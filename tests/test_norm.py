"""norm.BatchNorm against flax.linen.BatchNorm: variables, outputs, gradients, statistics."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg import norm


def _both(**kw):
  return norm.BatchNorm(**kw), nn.BatchNorm(**kw)


@pytest.mark.parametrize("dtype,use_scale,train", [
    (jnp.float32, True, True), (jnp.float32, False, True), (jnp.bfloat16, True, True),
    (jnp.float32, True, False)])
def test_same_as_flax(dtype, use_scale, train):
  ours, flax_bn = _both(use_running_average=not train, momentum=0.9, epsilon=1e-3,
                        dtype=dtype, use_scale=use_scale)
  # Off-centre inputs (mean 3), where the fast variance E[x^2] - E[x]^2 loses digits, so a
  # different formula would show.
  x = 3.0 + jax.random.normal(jax.random.key(0), (4, 6, 5, 7))
  variables = flax_bn.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(
      jnp.shape, variables)
  # Trained-looking parameters and statistics, so each one's role shows in the results.
  keys = iter(jax.random.split(jax.random.key(2), 8))
  variables = jax.tree.map(lambda v: v + 0.3 * jax.random.normal(next(keys), v.shape),
                           variables)
  variables["batch_stats"]["var"] = jnp.abs(variables["batch_stats"]["var"])
  dy = jax.random.normal(jax.random.key(3), x.shape)

  def run(module):
    def loss(params, x):
      y, updates = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
      return jnp.sum(y.astype(jnp.float32) * dy), (y, updates)
    (_, (y, updates)), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
        variables["params"], x)
    return y, updates, grads

  (y, updates, grads), (y_ref, updates_ref, grads_ref) = run(ours), run(flax_bn)
  assert y.dtype == y_ref.dtype == dtype
  tol = dict(rtol=1e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(np.float32(y), np.float32(y_ref), **tol)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5),
               updates, updates_ref)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tol), grads, grads_ref)
  if train:  # the statistics moved towards this batch's
    assert not np.allclose(updates["batch_stats"]["mean"], variables["batch_stats"]["mean"])


@pytest.mark.parametrize("dot_sums", ["1", "0"])
def test_sums_are_dots_on_cpu(monkeypatch, dot_sums):
  """The point of the module: no reduction over the batch in the train-mode step's program
  (plain reductions with JAXSEG_CPU_DOT_SUMS=0)."""
  monkeypatch.setenv(norm.DOT_SUMS, dot_sums)
  module = norm.BatchNorm()
  x = jnp.ones((2, 8, 8, 4))
  variables = module.init(jax.random.key(0), x)
  grad = jax.jit(jax.grad(lambda p: module.apply({**variables, "params": p}, x,
                                                  mutable=["batch_stats"])[0].sum()))
  hlo = grad.lower(variables["params"]).as_text()
  dots = "stablehlo.dot" in hlo or "dot_general" in hlo
  reductions = "stablehlo.reduce" in hlo.replace("stablehlo.reduce_precision", "")
  assert (dots, reductions) == ((True, False) if dot_sums == "1" else (False, True))
