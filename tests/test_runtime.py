"""jaxseg.runtime: the YNNPACK flag for XLA:CPU, when it is added, and that it changes no result;
the persistent compilation cache, where it is, and that the user's choice wins."""

import json
import os
import pathlib
import platform
import stat
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


# The persistent compilation cache (runtime.use_compilation_cache), each case in a fresh process:
# the cache is set once, at `import jaxseg`. The program imports jax first, as users do.
_CACHE_PROGRAM = """
import json, sys
if "--no-filelock" in sys.argv:
  sys.modules["filelock"] = None  # not installed
import jax, jax.numpy as jnp
from jax import monitoring
import os
if os.environ.get("PRE_IMPORT_DIR"):  # the user's jax.config, set before `import jaxseg`
  jax.config.update("jax_compilation_cache_dir", os.environ["PRE_IMPORT_DIR"])
import jaxseg
hits = []
monitoring.register_event_listener(
    lambda event, **_: hits.append(event) if event.endswith("/cache_hits") else None)
x = jax.jit(lambda x: jnp.tanh(x @ x.T) + jnp.sin(x).sum())(jnp.ones((16, 16)))
print(json.dumps({"dir": jaxseg.runtime.COMPILATION_CACHE_DIR,
                  "jax_dir": jax.config.jax_compilation_cache_dir,
                  "min_secs": jax.config.jax_persistent_cache_min_compile_time_secs,
                  "max_bytes": jax.config.jax_compilation_cache_max_size,
                  "hits": len(hits), "sum": float(x.sum())}))
"""
_CACHE_ENV = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
              "JAX_COMPILATION_CACHE_MAX_SIZE", "JAX_ENABLE_COMPILATION_CACHE",
              runtime.CACHE_OPT_OUT)


def _cache_env(tmp_path, **env):
  """The suite's environment without its cache (conftest.py), with XDG_CACHE_HOME in tmp_path."""
  base = {k: v for k, v in helpers.device_env(1).items() if k not in _CACHE_ENV}
  return {**base, "XDG_CACHE_HOME": str(tmp_path / "xdg"), **env}


def _start(env, *args):
  return subprocess.Popen([sys.executable, "-c", _CACHE_PROGRAM, *args], env=env, cwd=helpers.ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(process):
  out, err = process.communicate(timeout=300)
  assert process.returncode == 0, err
  return json.loads(out.strip().splitlines()[-1]), err


def _entries(directory):
  return sorted(p.name for p in pathlib.Path(directory).glob("*-cache"))


def test_the_default_cache_directory_is_used_and_read_back(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  expected = runtime.default_cache_dir() + ("" if runtime._has_filelock() else "-nolock")
  assert expected.startswith(str(tmp_path / "xdg" / "jaxseg" / "xla") + os.sep)
  # jaxseg's defaults: the directory, small programs cached, bounded (with filelock).
  first, _ = _result(_start(_cache_env(tmp_path)))
  assert first["dir"] == first["jax_dir"] == expected
  assert first["min_secs"] == runtime.CACHE_MIN_COMPILE_SECS
  assert first["max_bytes"] == (runtime.CACHE_MAX_BYTES if runtime._has_filelock() else -1)
  assert stat.S_IMODE(os.stat(expected).st_mode) == 0o700
  # Every program written (the user's min compile time wins), by two processes at once.
  env = _cache_env(tmp_path, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  for result, err in [_result(p) for p in [_start(env), _start(env)]]:
    assert result["min_secs"] == 0 and result["sum"] == first["sum"]
    assert "persistent compilation cache" not in err, err
  written = _entries(expected)
  assert any(name.startswith("jit__lambda") for name in written), written
  # A later process reads them back instead of compiling.
  again, err = _result(_start(env))
  assert again["hits"] >= 1 and again["sum"] == first["sum"], err
  assert _entries(expected) == written


def test_without_filelock_the_cache_is_unbounded_in_a_directory_of_its_own(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  env = _cache_env(tmp_path, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  result, err = _result(_start(env, "--no-filelock"))
  assert result["dir"] == runtime.default_cache_dir() + "-nolock"
  assert result["max_bytes"] == -1
  assert _entries(result["dir"]) and "persistent compilation cache" not in err, err


@pytest.mark.parametrize("case", ["opt_out", "jax_env", "jax_config", "jax_disabled"])
def test_the_users_choice_wins(tmp_path, case):
  mine = str(tmp_path / "mine")
  env = {"opt_out": {runtime.CACHE_OPT_OUT: "0"},
         "jax_env": {"JAX_COMPILATION_CACHE_DIR": mine},
         "jax_config": {"PRE_IMPORT_DIR": mine},
         "jax_disabled": {"JAX_ENABLE_COMPILATION_CACHE": "false"}}[case]
  result, _ = _result(_start(_cache_env(tmp_path, **env)))
  assert not (tmp_path / "xdg").exists()  # jaxseg's default directory is not even made
  assert result["min_secs"] == 1.0 and result["max_bytes"] == -1  # JAX's defaults, untouched
  if case in ("jax_env", "jax_config"):
    assert result["dir"] == result["jax_dir"] == mine
  else:
    assert result["dir"] is None


def test_an_unwritable_cache_directory_changes_nothing_else(tmp_path):
  (tmp_path / "file").write_text("not a directory")
  result, err = _result(_start(_cache_env(tmp_path, XDG_CACHE_HOME=str(tmp_path / "file"))))
  assert result["dir"] is None and result["jax_dir"] is None
  assert result["sum"] == pytest.approx(256 * (np.tanh(16.0) + 256 * np.sin(1.0)), rel=1e-5)
  said = [line for line in err.splitlines() if "compilation cache" in line]
  assert len(said) == 1 and "compilation cache off" in said[0], err


def test_the_default_directory(monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere/cache")
  path = runtime.default_cache_dir()
  assert os.path.dirname(path) == "/somewhere/cache/jaxseg/xla"
  assert os.path.basename(path).startswith(platform.machine())
  monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # not absolute: ignored (XDG spec)
  monkeypatch.setenv("HOME", "/home/someone")
  assert os.path.dirname(runtime.default_cache_dir()) == "/home/someone/.cache/jaxseg/xla"
  monkeypatch.delenv("XDG_CACHE_HOME")
  assert os.path.basename(runtime.default_cache_dir()) == os.path.basename(path)
  # Another CPU, another directory: XLA:CPU compiles for the host's instructions.
  monkeypatch.setattr(runtime, "_cpu_identity", lambda: "flags=sse2")
  assert os.path.basename(runtime.default_cache_dir()) != os.path.basename(path)


def test_the_suite_uses_its_own_cache():
  # conftest.py sets JAX_COMPILATION_CACHE_DIR: the user's setting, which wins.
  assert runtime.COMPILATION_CACHE_DIR == (os.environ["JAX_COMPILATION_CACHE_DIR"] or None)
