"""Process-wide XLA settings for fast CPU training, applied when `jaxseg` is imported.

XLA:CPU's own kernels compute the filter gradient of a convolution several times slower than
the forward pass (a 3x3, 64-channel conv at 256x256: forward 125 ms, filter gradient 810 ms on
2 cores), and 1x1 convolutions at about half of what the cores can do. XLA can hand dots, and
the convolutions it rewrites to dots, to the YNNPACK library instead: the same filter gradient
then takes 220 ms, and a U-Net train step went from 0.61 to 0.88 of PyTorch's speed
(benchmarks/RESULTS.md, "jaxseg vs PyTorch"). The flag that does this is `--xla_cpu_experimental_ynn_fusion_type`; its
default list is empty, so jaxseg adds `dot` to it.

XLA reads XLA_FLAGS once, when the first backend starts, and aborts on a flag it does not know,
so the flag is added only when that has not happened yet and jaxlib knows it (>= 0.8.1). Your
own setting of the flag in XLA_FLAGS wins, and JAXSEG_XLA_CPU_DEFAULTS=0 turns this off.
It changes only the CPU backend; GPUs and TPUs ignore it.

Compilation cache. Most of a short command's time is XLA compiling: for the 31M-parameter U-Net
(`experiments.unet --variant=unet`) on 2 cores, `jit(init)` takes 5-9 s and the train step 6-12 s,
so the first train step came after 16 s. jaxseg turns on JAX's persistent compilation cache,
so that a program compiled once is read back from disk (0.3 s for the train step) by every
later process that compiles it again: with the cache warm, the first step comes after 5.6 s
(benchmarks/startup.py; benchmarks/RESULTS.md, "Start-up").

  - where: `$XDG_CACHE_HOME/jaxseg/xla/<machine>-<cpu>` (default `~/.cache/jaxseg/xla/...`).
    The last part names the CPU (its /proc/cpuinfo identity): a home directory shared by
    machines with other instruction sets gets one cache each, as XLA:CPU's executables are
    compiled for the host CPU's features.
  - what: programs that took at least `CACHE_MIN_COMPILE_SECS` to compile (JAX's default, 1 s,
    would leave out the evaluation and prediction steps on CPU); at most `CACHE_MAX_BYTES`, the
    least recently used entries dropped first, when the `filelock` package is installed: JAX
    then also locks the directory around each read and write, so that processes that write
    an entry at once cannot leave a torn file or have one read half-written (JAX 0.10 writes
    entries in place, not by rename). Without `filelock` the cache is unbounded and unlocked,
    in a directory of its own (`...-nolock`; JAX's two kinds of cache cannot share one).
  - yours wins: a JAX_COMPILATION_CACHE_DIR (or `jax.config.update("jax_compilation_cache_dir",
    ...)` before `import jaxseg`) is left as it is, with JAX's own defaults, and so are
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS and JAX_COMPILATION_CACHE_MAX_SIZE.
    JAXSEG_COMPILATION_CACHE=0 turns jaxseg's default off; JAX_ENABLE_COMPILATION_CACHE=0 turns
    every cache off.
  - a directory that cannot be written: no cache, one warning line, nothing else changes.
  - emptying it is always safe (`rm -rf ~/.cache/jaxseg/xla`). Like any compilation cache it
    holds code that JAX runs: keep it private (it is made 0700).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_DOT = f"{YNN_FLAG}=LIBRARY_FUSION_TYPE_DOT"
OPT_OUT = "JAXSEG_XLA_CPU_DEFAULTS"
_FIRST_JAXLIB_WITH_FLAG = (0, 8, 1)

CACHE_OPT_OUT = "JAXSEG_COMPILATION_CACHE"
CACHE_MIN_COMPILE_SECS = 0.1
CACHE_MAX_BYTES = 1 << 30
_JAX_DEFAULT_MIN_COMPILE_SECS = 1.0
_JAX_DEFAULT_MAX_BYTES = -1
# The fields of /proc/cpuinfo that say which instructions and tuning LLVM picks for the host:
# x86 and ARM (the rest, e.g. MHz and core ids, differ between cores and boots).
_CPU_FIELDS = ("vendor_id", "cpu family", "model", "flags", "Features", "CPU implementer",
               "CPU architecture", "CPU variant", "CPU part")

logger = logging.getLogger(__name__)


def _is_off(value: str | None) -> bool:
  return (value or "").strip().lower() in ("0", "false", "no", "off")


def _jaxlib_version() -> tuple[int, ...]:
  import jaxlib  # pylint: disable=g-import-not-at-top
  parts = []
  for part in jaxlib.__version__.split(".")[:3]:
    digits = "".join(ch for ch in part if ch.isdigit())
    parts.append(int(digits or 0))
  return tuple(parts)


def _backends_started() -> bool:
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  started = getattr(xla_bridge, "backends_are_initialized", None)
  return bool(started()) if started is not None else bool(getattr(xla_bridge, "_backends", {}))


def use_fast_cpu_kernels() -> bool:
  """Adds `YNN_DOT` to XLA_FLAGS where it can take effect; returns whether it is in effect
  for this process (also when the user set the flag to `dot` themselves)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if YNN_FLAG in flags:  # the user's choice
    return YNN_DOT in flags or f"{YNN_FLAG}=dot" in flags
  if _is_off(os.environ.get(OPT_OUT)):
    return False
  if _jaxlib_version() < _FIRST_JAXLIB_WITH_FLAG or _backends_started():
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {YNN_DOT}".strip()
  return True


def _cpu_identity() -> str:
  """The first CPU's model and instruction set extensions (Linux); "" where unknown."""
  fields = {}
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      for line in f:
        if not line.strip():
          if fields:
            break  # the first processor's block is enough
          continue
        key, _, value = line.partition(":")
        if key.strip() in _CPU_FIELDS:
          fields[key.strip()] = " ".join(sorted(value.split())) if key.strip() in (
              "flags", "Features") else value.strip()
  except OSError:
    return ""
  return "\n".join(f"{key}={fields[key]}" for key in sorted(fields))


def default_cache_dir() -> str | None:
  """`$XDG_CACHE_HOME/jaxseg/xla/<machine>-<cpu>` (`~/.cache/...` without XDG_CACHE_HOME);
  None where there is no home directory to put it in."""
  base = os.environ.get("XDG_CACHE_HOME", "")
  if not os.path.isabs(base):  # the XDG spec: a relative path is ignored
    base = os.path.join(os.path.expanduser("~"), ".cache")
    if not os.path.isabs(base):  # no HOME, no passwd entry: "~" stays as it is
      return None
  tag = platform.machine() or "unknown"
  cpu = _cpu_identity()
  if cpu:
    tag += "-" + hashlib.sha256(cpu.encode()).hexdigest()[:12]
  return os.path.join(base, "jaxseg", "xla", tag)


def _writable_dir(path: str) -> bool:
  try:
    os.makedirs(path, mode=0o700, exist_ok=True)
  except OSError:
    return False
  return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def _has_filelock() -> bool:
  try:
    import filelock  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def use_compilation_cache() -> str | None:
  """Turns on JAX's persistent compilation cache in `default_cache_dir()` unless the user
  chose a cache (or none) themselves; returns the directory in effect (None: no cache).
  To take effect it must run before the process's first compilation."""
  import jax  # pylint: disable=g-import-not-at-top
  users = jax.config.jax_compilation_cache_dir
  if "JAX_COMPILATION_CACHE_DIR" in os.environ or users is not None:
    return users or None  # the user's choice, "" (no cache) included
  if not jax.config.jax_enable_compilation_cache or _is_off(os.environ.get(CACHE_OPT_OUT)):
    return None
  settings = {}
  if ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ and
      jax.config.jax_persistent_cache_min_compile_time_secs == _JAX_DEFAULT_MIN_COMPILE_SECS):
    settings["jax_persistent_cache_min_compile_time_secs"] = CACHE_MIN_COMPILE_SECS
  max_bytes = jax.config.jax_compilation_cache_max_size
  if ("JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ and max_bytes == _JAX_DEFAULT_MAX_BYTES
      and _has_filelock()):
    max_bytes = settings["jax_compilation_cache_max_size"] = CACHE_MAX_BYTES
  if max_bytes == 0:  # JAX's "no cache"
    return None
  path = default_cache_dir()
  if path is not None and max_bytes == -1:
    # JAX's unbounded cache neither locks nor writes the access times that its bounded one
    # needs of every entry (a bounded cache fails to write beside entries without them).
    path += "-nolock"
  if path is None or not _writable_dir(path):
    logger.warning("jaxseg: compilation cache off, %s cannot be written (set "
                   "JAX_COMPILATION_CACHE_DIR to a writable directory, or %s=0)",
                   path or "no home directory", CACHE_OPT_OUT)
    return None
  for name, value in settings.items():
    jax.config.update(name, value)
  jax.config.update("jax_compilation_cache_dir", path)
  return path


# At `import jaxseg` (which imports this module first): the cache must be set before the first
# compilation, and unlike XLA_FLAGS it can still be set once the backends have started.
COMPILATION_CACHE_DIR = use_compilation_cache()
