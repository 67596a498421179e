"""Peak memory and time of `python -m experiments.predict` on one very large photograph.

    python benchmarks/predict_memory.py --size=6000 --crop=512 --batch_size=8

A DeepLabV3+ ResNet-50 (random weights, 19 classes) that "trained" on `--crop` crops is saved
as a portable model file; predict then segments one `--size` x `--size` JPEG with default
settings (over twice the training size: sliding windows of the training size, said in one log
line) and with each `--window` given. Each prediction is its own process; its peak resident
memory (ru_maxrss) and wall time are printed.
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.inference import jaxseg_run  # noqa: E402
from jaxseg import portable  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")


def peak_of(command) -> tuple[float, float, str]:
  """(seconds, peak resident GB, last stderr line) of `command` in a child process."""
  start = time.perf_counter()
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  seconds = time.perf_counter() - start
  # RUSAGE_CHILDREN's ru_maxrss is the largest of the children waited for (KB on Linux): run
  # the settings from the smallest expected peak up, or one process per setting.
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
  if result.returncode:
    sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
  told = [line for line in result.stderr.splitlines() if "sliding window" in line]
  return seconds, peak, (told[0].split("] ")[-1] if told else "")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=int, default=6000)
  parser.add_argument("--crop", type=int, default=512)
  parser.add_argument("--batch_size", type=int, default=8, help="predict's --batch_size: "
                      "windows of one image predicted together")
  parser.add_argument("--windows", default="", help="comma-separated HxW settings besides "
                      "the default (0: whole image)")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as folder:
    run = jaxseg_run("deeplab_resnet50", 19)
    run.config.data.crop_size = (args.crop, args.crop)
    model_file = os.path.join(folder, "model.safetensors")
    portable.save_pretrained(run, model_file)
    image = os.path.join(folder, "big.jpg")
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (args.size // 16, args.size // 16, 3), dtype=np.uint8)
    Image.fromarray(small).resize((args.size, args.size)).save(image, quality=90)
    print(f"predict on one {args.size}x{args.size} JPEG, DeepLabV3+ ResNet-50 trained on "
          f"{args.crop}x{args.crop} crops, --batch_size={args.batch_size}, "
          f"{os.cpu_count()} CPU cores")
    for window in ["default", *filter(None, args.windows.split(","))]:
      command = [sys.executable, "-m", "experiments.predict", f"--workdir={model_file}",
                 f"--out_dir={os.path.join(folder, window)}",
                 f"--batch_size={args.batch_size}", image]
      if window != "default":
        command.append(f"--window={window}")
      seconds, peak, told = peak_of(command)
      print(f"--window={window:10s} {seconds:7.1f} s  peak {peak:5.2f} GB  {told}")


if __name__ == "__main__":
  main()
