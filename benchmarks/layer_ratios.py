"""Single layers, forward + backward, jaxseg against PyTorch, side by side in one process.

    python benchmarks/layer_ratios.py --steps=5

The models of benchmarks/compare_torch.py are stacks of a few layer kinds; this times one of
each at the map sizes where those models spend their time, so that a model's ratio below 1
can be traced to the layers that cause it. Each row is one layer (conv -> BatchNorm in
training mode -> ReLU, as jaxseg's ConvBNAct and torch's Conv2d + BatchNorm2d + ReLU),
gradients with respect to the input and every parameter, float32, torch in channels_last;
medians of alternating steps. Ratio = torch time / jaxseg time (> 1: jaxseg is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg import layers

# (name, batch, size, in channels, out channels, kernel, dilation, groups)
LAYERS = (
    ("U-Net level 1: 3x3 conv 64->64", 4, 256, 64, 64, 3, 1, 1),
    ("U-Net level 3: 3x3 conv 256->256", 4, 64, 256, 256, 3, 1, 1),
    ("ResNet layer3 (OS 16): 3x3 conv 256->256", 4, 16, 256, 256, 3, 1, 1),
    ("ResNet layer3: 1x1 conv 1024->256", 4, 16, 1024, 256, 1, 1, 1),
    ("ResNet layer4: 3x3 conv 512->512, dilation 4", 4, 16, 512, 512, 3, 4, 1),
    ("ASPP: 3x3 conv 2048->256, dilation 12", 4, 16, 2048, 256, 3, 12, 1),
    ("Xception entry: depthwise 3x3, 128 ch", 4, 128, 128, 128, 3, 1, 128),
    ("Xception middle: depthwise 3x3, 728 ch", 4, 16, 728, 728, 3, 1, 728),
    ("Xception middle: 1x1 conv 728->728", 4, 16, 728, 728, 1, 1, 1),
)


def _median_ms(fn, steps):
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def jax_layer(batch, size, cin, cout, k, dilation, groups):
  module = layers.ConvBNAct(cout, k, dilation=dilation, groups=groups)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, size, size, cin)), jnp.float32)
  variables = module.init(jax.random.key(0), x, train=True)

  @jax.jit
  def step(params, x):
    def loss(params, x):
      y, _ = module.apply({**variables, "params": params}, x, train=True,
                          mutable=["batch_stats"])
      return jnp.mean(jnp.square(y))
    return jax.grad(loss, (0, 1))(params, x)

  params = variables["params"]
  jax.block_until_ready(step(params, x))
  return lambda: jax.block_until_ready(step(params, x))


def torch_layer(batch, size, cin, cout, k, dilation, groups):
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  net = torch.nn.Sequential(
      torch.nn.Conv2d(cin, cout, k, padding=dilation * (k - 1) // 2, dilation=dilation,
                      groups=groups, bias=False),
      torch.nn.BatchNorm2d(cout), torch.nn.ReLU()).to(memory_format=torch.channels_last)
  x = torch.randn(batch, cin, size, size).contiguous(
      memory_format=torch.channels_last).requires_grad_()

  def step():
    net.zero_grad(set_to_none=True)
    x.grad = None
    net(x).square().mean().backward()

  step()
  return step


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  print(f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads), float32, median of {args.steps} alternating steps")
  print(f"{'layer':46s} {'input':>16s} {'jaxseg ms':>9s} {'torch ms':>8s} {'ratio':>6s}")
  for name, *shape in LAYERS:
    ours, theirs = jax_layer(*shape), torch_layer(*shape)
    jax_times, torch_times = [], []
    for _ in range(args.steps):
      jax_times.append(_median_ms(ours, 1))
      torch_times.append(_median_ms(theirs, 1))
    j, t = statistics.median(jax_times), statistics.median(torch_times)
    batch, size, cin = shape[:3]
    print(f"{name:46s} {f'{batch}x{size}x{size}x{cin}':>16s} {j:9.1f} {t:8.1f} {t / j:6.2f}",
          flush=True)


if __name__ == "__main__":
  main()
