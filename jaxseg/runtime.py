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
"""

from __future__ import annotations

import os

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_DOT = f"{YNN_FLAG}=LIBRARY_FUSION_TYPE_DOT"
OPT_OUT = "JAXSEG_XLA_CPU_DEFAULTS"
_FIRST_JAXLIB_WITH_FLAG = (0, 8, 1)


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
  if os.environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
    return False
  if _jaxlib_version() < _FIRST_JAXLIB_WITH_FLAG or _backends_started():
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {YNN_DOT}".strip()
  return True
