"""jaxseg.runtime: the YNNPACK flag for XLA:CPU, when it is added, and that it changes no result."""

import os
import subprocess
import sys

import numpy as np
import pytest

from jaxseg import runtime
from tests import helpers


def test_the_suite_runs_with_the_flag():
  # conftest sets XLA_FLAGS, `import jaxseg` adds the flag: CI tests the path users run.
  assert runtime.YNN_DOT in os.environ["XLA_FLAGS"]


@pytest.mark.parametrize("flags,env,started,added,in_effect", [
    ("--xla_force_host_platform_device_count=8", {}, False, True, True),
    ("", {runtime.OPT_OUT: "0"}, False, False, False),
    ("", {}, True, False, False),  # XLA has read its flags already
    (f"{runtime.YNN_FLAG}=eltwise", {}, False, False, False),  # the user's own value wins
    (f"{runtime.YNN_FLAG}=dot", {}, False, False, True),
])
def test_when_the_flag_is_added(monkeypatch, flags, env, started, added, in_effect):
  monkeypatch.setenv("XLA_FLAGS", flags)
  monkeypatch.delenv(runtime.OPT_OUT, raising=False)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  monkeypatch.setattr(runtime, "_backends_started", lambda: started)
  assert runtime.use_fast_cpu_kernels() == in_effect
  assert (os.environ["XLA_FLAGS"] == f"{flags} {runtime.YNN_DOT}".strip()) == added
  assert os.environ["XLA_FLAGS"].count(runtime.YNN_FLAG) == int(added or runtime.YNN_FLAG in flags)


def test_old_jaxlib_that_would_abort_on_the_flag_gets_none(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setattr(runtime, "_backends_started", lambda: False)
  monkeypatch.setattr(runtime, "_jaxlib_version", lambda: (0, 8, 0))
  assert not runtime.use_fast_cpu_kernels()
  assert os.environ["XLA_FLAGS"] == ""


# A small conv net's loss and gradients: 3x3 (also dilated and strided) and 1x1 convs, whose
# filter gradients are what the flag moves to YNNPACK, and a dense layer.
_PROGRAM = """
import sys
import jax, jax.numpy as jnp, numpy as np
import jaxseg
from jaxseg import layers
import flax.linen as nn
class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = layers.ConvBNAct(24, 3, strides=2)(x, train=True)
    x = layers.ConvBNAct(24, 3, dilation=2)(x, train=True)
    x = layers.ConvBNAct(32, 1)(x, train=True)
    return nn.Dense(5)(x)
x = jax.random.normal(jax.random.key(0), (2, 32, 32, 8))
variables = Net().init(jax.random.key(1), x)
def loss(params):
  y, _ = Net().apply({**variables, "params": params}, x, mutable=["batch_stats"])
  return jnp.mean(jnp.square(y))
value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
leaves = {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(grads)}
print("YNN", jaxseg.runtime.YNN_DOT in __import__("os").environ["XLA_FLAGS"])
np.savez(sys.argv[1], loss=np.asarray(value), **leaves)
"""


def test_the_flag_changes_no_result(tmp_path):
  """The same loss and gradients in a process with the flag and one without (float32
  rounding: the kernels sum in another order)."""
  results = {}
  for name, opt_out in (("with", "1"), ("without", "0")):
    env = dict(helpers.device_env(1), **{runtime.OPT_OUT: opt_out})
    env["XLA_FLAGS"] = env["XLA_FLAGS"].replace(runtime.YNN_DOT, "")
    out = subprocess.run([sys.executable, "-c", _PROGRAM, str(tmp_path / f"{name}.npz")],
                         env=env, cwd=helpers.ROOT, capture_output=True, text=True, check=True)
    assert f"YNN {name == 'with'}" in out.stdout
    results[name] = np.load(tmp_path / f"{name}.npz")
  assert set(results["with"].files) == set(results["without"].files)
  assert len(results["with"].files) > 10
  for key in results["with"].files:
    np.testing.assert_allclose(results["with"][key], results["without"][key], rtol=2e-5,
                               atol=1e-6, err_msg=key)
