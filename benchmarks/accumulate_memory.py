"""XLA's peak memory of one train step with gradient accumulation (train.accumulate_steps).

    python benchmarks/accumulate_memory.py                       # DeepLabV3+ R50, 512x512, batch 8
    python benchmarks/accumulate_memory.py --size=128 --micro=1,2

Compiles (does not run) the segmentation train step of DeepLabV3+ on ResNet-50 for each number
of micro-batches and prints XLA's memory analysis: the temporaries (activations kept for the
backward pass, gradients) and the peak (temporaries + arguments + outputs, jaxseg's
`train_step_peak_bytes`). `sequential` is the form accelerators run (a lax.scan: one micro-batch
alive at a time); `unrolled` the form jaxseg uses on the CPU, where XLA's loop is slow
(jaxseg.train.steps.weighted_mean_over). Compiling needs no accelerator: the figures are XLA's
plan for the backend it compiles for.
"""

import argparse

import jax
import jax.numpy as jnp

from experiments.configs import deeplab as deeplab_config
from jaxseg.train import build, steps, xla_stats


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=int, default=512, help="square crop size")
  parser.add_argument("--batch", type=int, default=8, help="global batch size")
  parser.add_argument("--micro", default="1,2,4", help="numbers of micro-batches")
  parser.add_argument("--backbone", default="resnet50")
  args = parser.parse_args()

  config = deeplab_config.get_config()
  config.model.backbone = args.backbone
  config.model.dtype = "float32"
  model = build.segmentation_model(config, 19)
  abstract = jax.eval_shape(build.segmentation_init(config, model, (args.size, args.size, 3)),
                            jax.random.key(0))
  schedule, _ = build.optimizer(config)
  loss_fn = build.loss(config, 255)
  batch = {"image": jax.ShapeDtypeStruct((args.batch, args.size, args.size, 3), jnp.uint8),
           "label": jax.ShapeDtypeStruct((args.batch, args.size, args.size), jnp.int32)}
  print(f"DeepLabV3+ {args.backbone}, {args.size}x{args.size}, global batch {args.batch}, "
        f"float32, backend {jax.default_backend()} ({jax.devices()[0].device_kind})")
  print(f"{'micro-batches':>13} {'form':>10} {'temporaries MB':>15} {'peak MB':>9} {'ratio':>6}")
  first = None
  for micro in map(int, args.micro.split(",")):
    for form in (("sequential", "unrolled") if micro > 1 else ("whole",)):
      step = steps.make_train_step(loss_fn, lambda x: x.astype(jnp.float32) / 255.0, schedule,
                                   accumulate_steps=micro, sequential=form == "sequential")
      compiled = jax.jit(step).lower(abstract, batch).compile()
      temporaries = compiled.memory_analysis().temp_size_in_bytes
      peak = xla_stats.peak_bytes(compiled)
      first = first or peak
      print(f"{micro:>13} {form:>10} {temporaries / 1e6:>15.0f} {peak / 1e6:>9.0f} "
            f"{peak / first:>6.2f}", flush=True)


if __name__ == "__main__":
  main()
