"""Up-sampling implementations side by side: time (forward + backward) and exactness.

    python benchmarks/upsample.py            # U-Net's levels at a 256x256 input, batch 8
    python benchmarks/upsample.py --size=64 --batch=8

- 2x2 stride-2 up-convolution: flax `nn.ConvTranspose` vs jaxseg's `UpConv2x2` (one einsum +
  depth-to-space), same weights.
- 2x bilinear: `jax.image.resize` vs jaxseg's `upsample2x_bilinear` (slices and adds).

Both pairs are run in the same process, interleaved, and reported as medians with their ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxseg.layers import UpConv2x2, upsample2x_bilinear  # noqa: E402


def _timed(fn, *args, repeats):
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _fwd_bwd(apply):
  """jit(value_and_grad of sum(apply(params, x)**2)) w.r.t. params and x."""
  return jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(apply(p, x) ** 2), argnums=(0, 1)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=256, help="U-Net input size")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, batch {args.batch}, "
        f"float32, forward + backward, median of {args.repeats}")
  print("| op | input (H, W, C) -> C | reference | jaxseg | speed-up | max abs diff |")
  print("|---|---|---|---|---|---|")
  key = jax.random.key(0)
  # U-Net's up-convolutions: from level l+1 (size / 2^(l+1), 64 * 2^(l+1) channels) to level l.
  for level in reversed(range(4)):
    h, c_in = args.size // 2 ** (level + 1), 64 * 2 ** (level + 1)
    x = jax.random.normal(key, (args.batch, h, h, c_in))
    ours = UpConv2x2(c_in // 2)
    params = ours.init(key, x)["params"]
    flipped = {"kernel": params["kernel"][::-1, ::-1], "bias": params["bias"]}
    reference = nn.ConvTranspose(c_in // 2, (2, 2), strides=(2, 2), padding="VALID")
    diff = float(jnp.abs(ours.apply({"params": params}, x) -
                         reference.apply({"params": flipped}, x)).max())
    t_ref = _timed(_fwd_bwd(lambda p, v: reference.apply({"params": p}, v)), flipped, x,
                   repeats=args.repeats)
    t_ours = _timed(_fwd_bwd(lambda p, v: ours.apply({"params": p}, v)), params, x,
                    repeats=args.repeats)
    print(f"| up-conv 2x2/2 | ({h}, {h}, {c_in}) -> {c_in // 2} | {t_ref * 1e3:.1f} ms | "
          f"{t_ours * 1e3:.1f} ms | {t_ref / t_ours:.2f}x | {diff:.1e} |", flush=True)
  # Attention U-Net's gate maps (1 channel) and a wide feature map.
  for h, c in ((args.size // 2, 1), (args.size // 8, 256)):
    x = jax.random.normal(key, (args.batch, h, h, c))
    resize = lambda _, v: jax.image.resize(v, (v.shape[0], 2 * v.shape[1], 2 * v.shape[2],
                                               v.shape[3]), "bilinear", antialias=False)
    diff = float(jnp.abs(resize(None, x) - upsample2x_bilinear(x)).max())
    t_ref = _timed(_fwd_bwd(resize), jnp.zeros(()), x, repeats=args.repeats)
    t_ours = _timed(_fwd_bwd(lambda _, v: upsample2x_bilinear(v)), jnp.zeros(()), x,
                    repeats=args.repeats)
    print(f"| bilinear 2x | ({h}, {h}, {c}) | {t_ref * 1e3:.1f} ms | {t_ours * 1e3:.1f} ms | "
          f"{t_ref / t_ours:.2f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
  main()
