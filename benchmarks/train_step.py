"""Times one jitted train step: compile time, median step time, images/s, memory, FLOP/s.

    python benchmarks/train_step.py --backbone=resnet101 --image_size=512 --batch_size=2

FLOPs come from XLA's cost analysis of the compiled step (forward + backward + update), so
FLOP/s is what the step achieved, not a hardware peak. Peak memory is XLA's own accounting of
the compiled step (arguments + outputs + temporaries - aliased donations) and, on GPU/TPU, the
allocator's peak; on CPU also the process's peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import jax
import numpy as np

from experiments.configs import deeplab as deeplab_config
from jaxseg.models import create_model
from jaxseg.train import build, segmentation, sharding, xla_stats


def step_setup(config, size, batch_size: int, num_classes: int = 19):
  """(jitted train step, initial state, a random uint8 batch) of `config`'s model and recipe
  (loss, optimizer) on the default mesh."""
  mesh = sharding.make_mesh()
  sharding.check_batch_size(batch_size, mesh)
  compute = build.compute_dtype(config.model.dtype)
  model = create_model(config.model.name, num_classes=num_classes,
                       backbone=config.model.get("backbone"), dtype=compute,
                       **build.model_kwargs(config))
  config.train.steps = 1000
  state, state_sharding = segmentation.create_train_state(config, model, mesh, (*size, 3))
  train_step, _ = segmentation.jit_steps(config, mesh, state_sharding, num_classes, 255)
  rng = np.random.default_rng(0)
  batch = sharding.put_batch({
      "image": rng.integers(0, 256, (batch_size, *size, 3), dtype=np.uint8),
      "label": rng.integers(0, num_classes, (batch_size, *size), dtype=np.uint8)},
      mesh)
  return train_step, state, batch


def measure(model_name: str = "deeplabv3plus", backbone: str = "resnet101", size=(512, 512),
            batch_size: int = 2, dtype: str = "auto", output_stride: int = 16,
            separable: bool = False, num_classes: int = 19, steps: int = 5) -> dict:
  """Compiles and times the train step on random uint8 batches; returns the figures."""
  config = deeplab_config.get_config()
  config.model.name, config.model.backbone, config.model.dtype = model_name, backbone, dtype
  config.model.output_stride, config.model.separable = output_stride, separable
  compute = build.compute_dtype(dtype)
  train_step, state, batch = step_setup(config, size, batch_size, num_classes)

  t = time.perf_counter()
  compiled, stats = xla_stats.compile_with_stats(train_step, state, batch)
  compile_s = time.perf_counter() - t
  flops = stats["flops"] if stats["flops"] is not None else float("nan")
  state, out = compiled(state, batch)  # warm-up
  jax.block_until_ready(out)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, out = compiled(state, batch)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t)
  step_s = statistics.median(times)
  xla_peak = stats["peak_bytes"] if stats["peak_bytes"] is not None else float("nan")
  return {"compile_s": compile_s, "step_s": step_s, "times": times, "flops": flops,
          "images_per_second": batch_size / step_s, "xla_peak": xla_peak,
          "dtype": np.dtype(compute).name, "loss": float(out["loss"]),
          "finite": bool(out["finite"])}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="deeplabv3plus")
  parser.add_argument("--backbone", default="resnet101")
  parser.add_argument("--image_size", type=int, nargs="+", default=[512])
  parser.add_argument("--batch_size", type=int, default=2, help="global batch")
  parser.add_argument("--dtype", default="auto", choices=build.DTYPES)
  parser.add_argument("--output_stride", type=int, default=16)
  parser.add_argument("--separable", action="store_true")
  parser.add_argument("--num_classes", type=int, default=19)
  parser.add_argument("--steps", type=int, default=5, help="timed steps after the first")
  args = parser.parse_args()
  size = tuple(args.image_size * 2 if len(args.image_size) == 1 else args.image_size)
  r = measure(args.model, args.backbone, size, args.batch_size, args.dtype, args.output_stride,
              args.separable, args.num_classes, args.steps)
  device_stats = jax.devices()[0].memory_stats() or {}
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
  times = r["times"]

  print(f"device          {jax.devices()[0].device_kind} x{jax.device_count()} "
        f"({jax.default_backend()}), jax {jax.__version__}")
  print(f"model           {args.model} {args.backbone} os{args.output_stride}"
        f"{' separable' if args.separable else ''}, {size[0]}x{size[1]}, batch "
        f"{args.batch_size}, {r['dtype']}")
  print(f"compile         {r['compile_s']:.1f} s")
  print(f"step (median)   {r['step_s'] * 1e3:.1f} ms over {args.steps} steps "
        f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})")
  print(f"images/s        {r['images_per_second']:.2f}")
  print(f"FLOPs/step      {r['flops'] / 1e9:.1f} GFLOP (XLA cost analysis)")
  print(f"FLOP/s          {r['flops'] / r['step_s'] / 1e12:.3f} TFLOP/s")
  print(f"peak memory     {r['xla_peak'] / 2**30:.2f} GiB (XLA buffers)"
        + (f", {device_stats['peak_bytes_in_use'] / 2**30:.2f} GiB (allocator peak)"
           if "peak_bytes_in_use" in device_stats else f", {rss:.2f} GiB (process peak RSS)"))
  print(f"loss            {r['loss']:.4f} (finite: {r['finite']})")


if __name__ == "__main__":
  main()
