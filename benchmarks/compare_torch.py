"""jaxseg's train step against the same model in plain PyTorch, side by side in one process.

    python benchmarks/compare_torch.py --size=256 --batch_size=4 --steps=5
    python benchmarks/compare_torch.py --models=unet,deeplab_resnet101 --size=128

For each model, the jaxseg train step (the experiment's recipe: CE + Dice loss, AdamW,
BatchNorm in training mode, float32 on CPU) and a PyTorch twin (benchmarks/torch_models.py:
the same layers, checked to have the same number of parameters before anything is timed;
channels_last, the same loss and optimizer) are timed alternately, one step each in turn,
after a warm-up step each, so that the machine's noise falls on both. Prints the median step
times, images/s, peak memory (jaxseg: XLA's buffer assignment; torch: the peak RSS growth of
two steps from the built model, optimizer state included, measured in a fresh process) and
the ratio torch time / jaxseg time (> 1: jaxseg is
faster). torch is a benchmark-only dependency (`pip install torch`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_models  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments.configs import deeplab as deeplab_config  # pylint: disable=wrong-import-position
from experiments.configs import unet as unet_config  # pylint: disable=wrong-import-position
from jaxseg.train import xla_stats  # pylint: disable=wrong-import-position

NUM_CLASSES = 19


def jaxseg_config(name: str):
  """The experiment config of a benchmark model name (float32: XLA's CPU bf16 convs are slow)."""
  if name in ("unet", "attention_unet"):
    config = unet_config.get_config()
    config.model.name = name
  else:
    config = deeplab_config.get_config()
    backbone = name.split("_")[1]
    config.model.backbone = backbone
    config.model.separable = name.endswith("_separable")
  config.model.dtype = "float32"
  return config


def torch_step(model, size, batch_size: int, num_classes: int, device: str = "cpu",
               autocast=None):
  """A closure doing one train step of `model` on a fixed random batch: CE + Dice, AdamW;
  the forward pass under `torch.autocast(dtype=autocast)` when given, the loss in float32."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(0)
  images = torch.randint(0, 256, (batch_size, 3, *size), generator=gen).float()
  images = ((images - 127.5) / 64.0).contiguous(memory_format=torch.channels_last).to(device)
  labels = torch.randint(0, num_classes, (batch_size, *size), generator=gen).to(device)
  model = model.to(memory_format=torch.channels_last).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)

  def step():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=autocast or torch.float32, enabled=autocast is not None):
      logits = model(images)
    logits = logits.float()
    probabilities = logits.softmax(1)
    one_hot = F.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()
    intersection = (probabilities * one_hot).sum((0, 2, 3))
    dice = 1 - (2 * intersection + 1) / (probabilities.sum((0, 2, 3)) + one_hot.sum((0, 2, 3))
                                         + 1)
    loss = F.cross_entropy(logits, labels, ignore_index=255) + dice.mean()
    loss.backward()
    optimizer.step()
    return loss.detach()

  return step


def torch_peak_rss(name: str, size, batch_size: int) -> int:
  """Bytes the process's peak RSS grows by over two torch train steps of the built model (the
  optimizer state is allocated by the first), in a fresh process so that JAX's memory does
  not count."""
  out = subprocess.run([sys.executable, __file__, f"--torch_memory_of={name}",
                        f"--size={size[0]}", f"--batch_size={batch_size}"],
                       capture_output=True, text=True, check=True)
  return int(out.stdout.strip().splitlines()[-1])


def _measure_torch_memory(name: str, size, batch_size: int) -> None:
  step = torch_step(torch_models.build(name, NUM_CLASSES), size, batch_size, NUM_CLASSES)
  before = _peak_rss()  # model, batch: built
  step()  # the first step also allocates the optimizer state, as jaxseg's state holds it
  step()
  print(_peak_rss() - before)


def _peak_rss() -> int:
  """This process's peak RSS in bytes (VmHWM: unlike getrusage's ru_maxrss, it is not
  inherited from the parent process that started this one)."""
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def compare(name: str, size, batch_size: int, steps: int) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  config = jaxseg_config(name)
  jax_step, state, batch = train_step.step_setup(config, size, batch_size, NUM_CLASSES)
  compiled, stats = xla_stats.compile_with_stats(jax_step, state, batch)
  jax_params = int(sum(x.size for x in jax.tree.leaves(state.params)))
  model = torch_models.build(name, NUM_CLASSES)
  torch_params = torch_models.count_params(model)
  if torch_params != jax_params:
    raise SystemExit(f"{name}: the torch twin has {torch_params:,} parameters, jaxseg "
                     f"{jax_params:,}; fix benchmarks/torch_models.py before timing")
  step = torch_step(model, size, batch_size, NUM_CLASSES)
  state, out = compiled(state, batch)  # warm-up, both
  jax.block_until_ready(out)
  step()
  jax_times, torch_times = [], []
  for _ in range(steps):
    t = time.perf_counter()
    state, out = compiled(state, batch)
    jax.block_until_ready(out)
    jax_times.append(time.perf_counter() - t)
    t = time.perf_counter()
    step()
    torch_times.append(time.perf_counter() - t)
  jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)
  return {"model": name, "params": jax_params, "jaxseg_ms": jax_s * 1e3,
          "torch_ms": torch_s * 1e3, "jaxseg_images_per_second": batch_size / jax_s,
          "torch_images_per_second": batch_size / torch_s, "ratio": torch_s / jax_s,
          "jaxseg_peak_gib": (stats["peak_bytes"] or float("nan")) / 2**30,
          "torch_peak_gib": torch_peak_rss(name, size, batch_size) / 2**30,
          "torch_threads": torch.get_num_threads()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default=",".join(torch_models.NAMES))
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--batch_size", type=int, default=4)
  parser.add_argument("--steps", type=int, default=5, help="timed steps of each, alternating")
  parser.add_argument("--json", default=None, help="also write the rows here")
  parser.add_argument("--torch_memory_of", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  size = (args.size, args.size)
  if args.torch_memory_of:
    _measure_torch_memory(args.torch_memory_of, size, args.batch_size)
    return
  import torch  # pylint: disable=g-import-not-at-top
  print(f"{jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads); {args.size}x{args.size}, "
        f"batch {args.batch_size}, float32, median of {args.steps} alternating steps")
  print(f"{'model':30s} {'params':>11s} {'jaxseg ms':>10s} {'torch ms':>9s} {'ratio':>6s} "
        f"{'jaxseg img/s':>12s} {'torch img/s':>11s} {'jaxseg GiB':>10s} {'torch GiB':>9s}")
  rows = []
  for name in args.models.split(","):
    r = compare(name, size, args.batch_size, args.steps)
    rows.append(r)
    print(f"{name:30s} {r['params']:>11,} {r['jaxseg_ms']:>10.0f} {r['torch_ms']:>9.0f} "
          f"{r['ratio']:>6.2f} {r['jaxseg_images_per_second']:>12.2f} "
          f"{r['torch_images_per_second']:>11.2f} {r['jaxseg_peak_gib']:>10.2f} "
          f"{r['torch_peak_gib']:>9.2f}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
