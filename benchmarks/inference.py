"""Inference speed, side by side in one run: jaxseg's jitted model, the exported StableHLO
(experiments.export), onnxruntime on its ONNX export, and PyTorch eager on the twin models of
benchmarks/torch_models.py.

    python benchmarks/inference.py --size=512 --batch_size=1 --repeats=3

"jaxseg (jit)" passes the weights to the jitted function as arguments (`Run.probabilities`);
"frozen" compiles them in as constants (`Run.frozen()`, what `experiments.predict` runs on a
CPU). Every row is the whole prediction of a uint8 batch: normalisation, the network, softmax and
argmax (PyTorch: the same, on a channels_last float batch). Random weights: speed does not
depend on them. Images/s is the batch size over the median time of `repeats` calls after one
warm-up call (which compiles the jitted ones).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks import torch_models  # noqa: E402
from jaxseg import export, runs  # noqa: E402
from jaxseg.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, make_normalize  # noqa: E402
from jaxseg.train.workdir import Classes  # noqa: E402

MODELS = ("deeplab_resnet50", "unet")


def timed(fn, repeats: int) -> float:
  fn()  # warm-up: compiles
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    seconds.append(time.perf_counter() - start)
  return statistics.median(seconds)


def jaxseg_run(name: str, num_classes: int) -> runs.Run:
  model = torch_models.jaxseg_model(name, num_classes)
  config = torch_models.jaxseg_config(name)
  variables = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                         train=False))()
  classes = Classes(tuple(f"c{i}" for i in range(num_classes)),
                    np.zeros((num_classes, 3), np.uint8))
  return runs.Run(config, model, variables, make_normalize(), num_classes, 0, classes)


def torch_predict(name: str, num_classes: int):
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  model = torch_models.build(name, num_classes).eval().to(memory_format=torch.channels_last)
  mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

  def predict(images):
    with torch.inference_mode():
      x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
      x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
      probabilities = torch.softmax(model(x), dim=1)
      return probabilities, probabilities.argmax(1)

  return predict


def onnx_predict(run: runs.Run, size: int, folder: str):
  """onnxruntime on the model's ONNX export (experiments.export --format=onnx), every core."""
  export.export(run, folder, formats=["onnx"], size=(size, size))
  session = export.onnx_session(folder, threads=os.cpu_count())
  return lambda images: session.run(None, {"images": images})


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--batch_size", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--num_classes", type=int, default=19)
  parser.add_argument("--models", default=",".join(MODELS))
  args = parser.parse_args()
  images = np.random.default_rng(0).integers(
      0, 256, (args.batch_size, args.size, args.size, 3), dtype=np.uint8)
  print(f"{jax.device_count()} {jax.devices()[0].device_kind} device(s), {os.cpu_count()} CPU "
        f"cores; batch {args.batch_size} of {args.size}x{args.size}, median of {args.repeats}")
  print(f"{'model':18s} {'runtime':22s} {'images/s':>9s} {'vs jaxseg':>9s}")
  for name in args.models.split(","):
    run = jaxseg_run(name, args.num_classes)
    blob, _ = export.export_stablehlo(run)
    exported = jax.export.deserialize(bytearray(blob))
    frozen = run.frozen()
    rows = {
        "jaxseg (jit)": lambda: jax.block_until_ready(run.probabilities(images).argmax(-1)),
        "jaxseg (jit, frozen)": lambda: jax.block_until_ready(
            frozen.probabilities(images).argmax(-1)),
        "exported StableHLO": lambda: jax.block_until_ready(exported.call(images)),
    }
    with tempfile.TemporaryDirectory() as folder:
      onnx = onnx_predict(run, args.size, folder)
    rows["onnxruntime"] = lambda: onnx(images)
    predict = torch_predict(name, args.num_classes)
    rows["PyTorch eager"] = lambda: predict(images)
    base = None
    for runtime, fn in rows.items():
      seconds = timed(fn, args.repeats)
      speed = args.batch_size / seconds
      base = base or speed
      print(f"{name:18s} {runtime:22s} {speed:9.2f} {speed / base:8.2f}x")


if __name__ == "__main__":
  main()
