"""Depthwise convolutions: XLA's grouped conv vs jaxseg's `layers.depthwise_conv`.

    python benchmarks/depthwise.py             # the shapes of a 256x256 input, batch 4
    python benchmarks/depthwise.py --size=512 --batch=2

Forward + backward (input and filter gradients) of the depthwise 3x3 convs DeepLabV3+ runs:
separable ASPP at rates 6/12/18 over the backbone's 2048 channels (output stride 16), the
separable decoder at stride 4, and Xception-65's middle flow (728 channels) and a strided
entry-flow conv. Both run in the same process, interleaved; medians, their ratio and the
largest relative difference of the outputs and gradients.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxseg.layers import depthwise_conv  # noqa: E402


def grouped_conv(x, kernel, strides, dilation, padding):
  return jax.lax.conv_general_dilated(
      x, kernel, (strides, strides), [(padding, padding)] * 2, rhs_dilation=(dilation,) * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  s, b = args.size, args.batch
  cases = [  # (name, (h, w, c), strides, dilation)
      ("ASPP rate 6, 2048 ch, /16", (s // 16, s // 16, 2048), 1, 6),
      ("ASPP rate 12", (s // 16, s // 16, 2048), 1, 12),
      ("ASPP rate 18", (s // 16, s // 16, 2048), 1, 18),
      ("decoder, 304 ch, /4", (s // 4, s // 4, 304), 1, 1),
      ("Xception middle flow, 728 ch, /16", (s // 16, s // 16, 728), 1, 1),
      ("Xception entry, 256 ch, /4, stride 2", (s // 4, s // 4, 256), 2, 1),
  ]
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; batch {b}, input {s}x{s}, "
        f"float32, forward + backward, median of {args.repeats}")
  print(f"{'conv':40s} {'grouped ms':>11s} {'jaxseg ms':>10s} {'ratio':>6s} {'max rel diff':>12s}")
  for name, (h, w, c), strides, dilation in cases:
    x = jax.random.normal(jax.random.key(0), (b, h, w, c))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 1, c)) * 0.1

    def timed(fn):
      grad = jax.jit(jax.value_and_grad(
          lambda x, k: jnp.sum(fn(x, k, strides, dilation, dilation) ** 2), argnums=(0, 1)))
      return grad, jax.block_until_ready(grad(x, kernel))

    (plain, want), (fast, got) = timed(grouped_conv), timed(depthwise_conv)
    times = {plain: [], fast: []}
    for _ in range(args.repeats):
      for fn in (plain, fast):
        t = time.perf_counter()
        jax.block_until_ready(fn(x, kernel))
        times[fn].append(time.perf_counter() - t)
    a, f = statistics.median(times[plain]), statistics.median(times[fast])
    diff = max(float(jnp.max(jnp.abs(g - w)) / (jnp.max(jnp.abs(w)) + 1e-30))
               for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    print(f"{name:40s} {a * 1e3:>11.1f} {f * 1e3:>10.1f} {a / f:>6.1f} {diff:>12.1e}",
          flush=True)


if __name__ == "__main__":
  main()
