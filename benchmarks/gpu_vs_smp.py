"""DeepLabV3+ ResNet-101 train step on one GPU: jaxseg (bf16) against segmentation_models_pytorch.

    python benchmarks/gpu_vs_smp.py --sizes=512x512,512x1024 --batch_size=8 --steps=20
    python benchmarks/gpu_vs_smp.py --sizes=64x64 --batch_size=2 --steps=2   # a CPU smoke run

jaxseg: the experiment's recipe (CE + Dice, AdamW, BatchNorm in training mode) with bfloat16
compute and float32 parameters. PyTorch: `smp.DeepLabV3Plus("resnet101", encoder_weights=None)`
with AMP bfloat16 autocast, channels_last and the same loss and optimizer, eager and (with
--compile) `torch.compile`d. The two are timed alternately, one step each in turn, after warm-up
steps, on the same fixed random batch. Prints median step time, images/s, peak device memory,
and jaxseg's model FLOPs utilisation: FLOPs of the compiled step from XLA's cost analysis /
step time / the GPU's dense bf16 peak (a table of known GPUs, or --peak_tflops). The
two networks are the same architecture but not the same parameter count (smp's ASPP and
decoder are separable by default): both counts are printed. Needs torch and
segmentation_models_pytorch (benchmark-only dependencies).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_torch  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments.configs import deeplab as deeplab_config  # pylint: disable=wrong-import-position
from jaxseg.train import xla_stats  # pylint: disable=wrong-import-position

NUM_CLASSES = 19

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4,
                    "A100": 312.0, "L4": 121.0, "B200": 2250.0}


def peak_tflops(device_kind: str) -> float | None:
  """The first table entry whose name is in the device kind ("NVIDIA H100 80GB HBM3")."""
  for name, tflops in PEAK_BF16_TFLOPS.items():  # the more specific names come first
    if name in device_kind:
      return tflops
  return None


def jaxseg_step(size, batch_size: int):
  config = deeplab_config.get_config()
  config.model.backbone = "resnet101"
  config.model.dtype = "bfloat16"
  step, state, batch = train_step.step_setup(config, size, batch_size, NUM_CLASSES)
  compiled, stats = xla_stats.compile_with_stats(step, state, batch)
  params = int(sum(x.size for x in jax.tree.leaves(state.params)))
  holder = {"state": state}

  def run():
    holder["state"], out = compiled(holder["state"], batch)
    jax.block_until_ready(out)

  return run, stats["flops"], params


def smp_step(size, batch_size: int, compile_model: bool):
  import segmentation_models_pytorch as smp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = smp.DeepLabV3Plus("resnet101", encoder_weights=None, classes=NUM_CLASSES)
  params = sum(p.numel() for p in model.parameters())
  model = model.to(device)
  if compile_model:
    model = torch.compile(model)
  inner = compare_torch.torch_step(model, size, batch_size, NUM_CLASSES, device=device,
                                   autocast=torch.bfloat16)

  def run():
    inner()
    if device == "cuda":
      torch.cuda.synchronize()

  return run, params


def _peak_memory_gib() -> dict:
  out = {}
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["jaxseg"] = stats["peak_bytes_in_use"] / 2**30
  import torch  # pylint: disable=g-import-not-at-top
  if torch.cuda.is_available():
    out["torch"] = torch.cuda.max_memory_allocated() / 2**30
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="512x512,512x1024", help="HxW,HxW,...")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--steps", type=int, default=20, help="timed steps of each, alternating")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--compile", action="store_true", help="also torch.compile the smp model")
  parser.add_argument("--jaxseg_only", action="store_true", help="no PyTorch side (MFU only)")
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="the device's dense bf16 peak (default: from the table)")
  args = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  if not args.jaxseg_only:
    if importlib.util.find_spec("segmentation_models_pytorch") is None:
      sys.exit("error: the PyTorch side needs segmentation_models_pytorch (pip install "
               "segmentation-models-pytorch), or pass --jaxseg_only")
  device = jax.devices()[0]
  peak = args.peak_tflops or peak_tflops(device.device_kind)
  print(f"{device.device_kind}: jax {jax.__version__}, torch {torch.__version__}, bf16 peak "
        f"{peak or 'unknown'} TFLOP/s; batch {args.batch_size}, median of {args.steps} "
        f"alternating steps after {args.warmup} warm-up steps")
  for text in args.sizes.split(","):
    size = tuple(int(v) for v in text.split("x"))
    runs = {}
    runs["jaxseg"], flops, jax_params = jaxseg_step(size, args.batch_size)
    torch_params = 0
    if not args.jaxseg_only:
      runs["smp eager"], torch_params = smp_step(size, args.batch_size, False)
      if args.compile:
        runs["smp compiled"], _ = smp_step(size, args.batch_size, True)
    print(f"{text}: jaxseg {jax_params:,} parameters, smp {torch_params:,}; XLA counts "
          f"{(flops or float('nan')) / 1e9:,.1f} GFLOP per jaxseg step")
    for run in runs.values():
      for _ in range(args.warmup):
        run()
    times = {name: [] for name in runs}
    for _ in range(args.steps):
      for name, run in runs.items():
        start = time.perf_counter()
        run()
        times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    memory = _peak_memory_gib()
    for name, seconds in medians.items():
      line = (f"  {name:13s} {seconds * 1e3:9.1f} ms/step {args.batch_size / seconds:8.1f} "
              f"img/s  jaxseg speed-up x{medians[name] / medians['jaxseg']:.2f}")
      if name == "jaxseg":
        if flops and peak:
          line += f"  MFU {flops / seconds / (peak * 1e12):.1%}"
        line += f"  peak so far {memory.get('jaxseg', float('nan')):.2f} GiB"
      print(line, flush=True)
    if "torch" in memory:
      print(f"  torch peak allocated (all smp runs so far): {memory['torch']:.2f} GiB")


if __name__ == "__main__":
  main()
