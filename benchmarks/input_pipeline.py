"""Images/s of the training input pipeline with N grain workers, next to the train step's rate.

    python benchmarks/input_pipeline.py --data_dir=../shared/data/camvid --workers 0 1 2 4

The CamVid frames (360x480) are upscaled once to Cityscapes' 1024x2048 and stored as PNG in
the CamVid layout under --cache_dir, so each example costs what a Cityscapes one does: a 2 MP
PNG decode, then random scale (0.5-2.0), 512x1024 crop/pad, flip and photometric jitter. The
train step of DeepLabV3+ at the crop size is timed in the same process (benchmarks/
train_step.py) and the ratio says whether the pipeline keeps the device busy: a ratio below 1
means the accelerator waits for data.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from PIL import Image
from tqdm import tqdm

import train_step
from jaxseg.data import CamVid, pipeline, transforms


def upscaled_copy(data_dir: str, cache_dir: str, size: tuple[int, int], count: int) -> str:
  """The first `count` CamVid train pairs resized to `size` (h, w), written once."""
  root = os.path.join(cache_dir, f"camvid_{size[0]}x{size[1]}_{count}")
  done = os.path.join(root, "COMPLETE")
  if os.path.exists(done):
    return root
  source = CamVid("train", data_dir=data_dir)
  os.makedirs(os.path.join(root, "train"), exist_ok=True)
  os.makedirs(os.path.join(root, "trainannot"), exist_ok=True)
  for i in tqdm(range(min(count, len(source))), desc="upscaling CamVid", unit="image"):
    example = source[i]
    stem = os.path.splitext(example["name"])[0]
    label = np.where(example["label"] == 255, CamVid.void, example["label"]).astype(np.uint8)
    Image.fromarray(example["image"]).resize(size[::-1], Image.BILINEAR).save(
        os.path.join(root, "train", stem + ".png"))
    Image.fromarray(label).resize(size[::-1], Image.NEAREST).save(
        os.path.join(root, "trainannot", stem + ".png"))
  open(done, "w").close()  # only a finished copy is reused
  return root


def pipeline_rate(source, workers: int, batch_size: int, batches: int,
                  crop: tuple[int, int]) -> tuple[float, float]:
  """(seconds to the first batch, images/s over the following `batches`)."""
  loader = pipeline.train_loader(
      source, batch_size=batch_size, seed=0, worker_count=workers,
      operations=[pipeline.DropBadExamples(), transforms.Augment(crop),
                  pipeline.ValidateLabels(source.num_classes, source.ignore_index)])
  iterator = iter(loader)
  t = time.perf_counter()
  next(iterator)
  first = time.perf_counter() - t
  t = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  rate = batches * batch_size / (time.perf_counter() - t)
  pipeline.close_iterator(iterator)
  return first, rate


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default="../shared/data/camvid")
  parser.add_argument("--cache_dir", default="/tmp/jaxseg_bench")
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--size", type=int, nargs=2, default=[1024, 2048], help="upscaled h w")
  parser.add_argument("--crop", type=int, nargs=2, default=[512, 1024])
  parser.add_argument("--images", type=int, default=64, help="upscaled images to cycle over")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--batches", type=int, default=12, help="timed batches per setting")
  parser.add_argument("--backbone", default="resnet50")
  parser.add_argument("--train_batch_size", type=int, default=2)
  parser.add_argument("--train_steps", type=int, default=2, help="0 skips the train step")
  args = parser.parse_args()
  crop = tuple(args.crop)

  root = upscaled_copy(args.data_dir, args.cache_dir, tuple(args.size), args.images)
  source = CamVid("train", data_dir=root)
  print(f"pipeline: CamVid upscaled to {args.size[0]}x{args.size[1]} PNG, scale 0.5-2.0, crop "
        f"{crop[0]}x{crop[1]}, flip, photometric; batch {args.batch_size}, "
        f"{os.cpu_count()} CPUs")
  rates = {}
  for workers in args.workers:
    first, rate = pipeline_rate(source, workers, args.batch_size, args.batches, crop)
    rates[workers] = rate
    print(f"  workers={workers:<3d} first batch {first:6.1f} s   {rate:7.1f} images/s")

  if args.train_steps:
    r = train_step.measure("deeplabv3plus", args.backbone, crop, args.train_batch_size,
                           num_classes=source.num_classes, steps=args.train_steps)
    best = max(rates, key=rates.get)
    print(f"train step: DeepLabV3+ {args.backbone} {crop[0]}x{crop[1]} batch "
          f"{args.train_batch_size} ({r['dtype']}): {r['images_per_second']:.2f} images/s")
    print(f"pipeline / train step: {rates[best] / r['images_per_second']:.1f}x with "
          f"{best} workers ({'keeps up' if rates[best] >= r['images_per_second'] else 'starves'}"
          " the device)")


if __name__ == "__main__":
  main()
