"""SLIC in JAX vs scikit-image's: boundary recall, under-segmentation error and ms per image.

    python benchmarks/superpixels.py --data_dir=../shared/data/camvid --images=20

Quality is measured on CamVid val frames at their 360x480 size against the 11-class labels;
speed at 360x480 and at 512x1024 (the frames upscaled, Cityscapes' training crop), skimage one
image at a time on the CPU, JAX jitted over a batch on the default device (compile excluded).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from jaxseg.data import CamVid, superpixels as sp
from jaxseg.ops import slic as jslic


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default="../shared/data/camvid")
  parser.add_argument("--images", type=int, default=20)
  parser.add_argument("--n_segments", type=int, default=400)
  parser.add_argument("--batch_size", type=int, default=4)
  args = parser.parse_args()

  source = CamVid("val", data_dir=args.data_dir)
  picks = np.linspace(0, len(source) - 1, args.images).astype(int)
  frames = [source[int(i)] for i in picks]
  h, w = frames[0]["label"].shape
  grid = jslic.grid_for(h, w, args.n_segments)
  run = jax.jit(functools.partial(jslic.slic, grid=grid))
  run(np.stack([frames[0]["image"]] * args.batch_size)).block_until_ready()  # compile

  rows = {"skimage": [], "jax": []}
  for frame in tqdm(frames, desc="quality", unit="image"):
    mine = np.asarray(run(np.stack([frame["image"]] * args.batch_size)))[0]
    reference = sp.slic(frame["image"], n_segments=args.n_segments)
    for name, segments in (("skimage", reference), ("jax", mine)):
      rows[name].append((sp.boundary_recall(segments, frame["label"]),
                         sp.undersegmentation_error(segments, frame["label"], 11),
                         len(np.unique(segments))))

  def speed(size):
    images = [np.asarray(Image.fromarray(f["image"]).resize(size[::-1], Image.BILINEAR))
              for f in frames[:args.batch_size]]
    t = time.perf_counter()
    for image in images:
      sp.slic(image, n_segments=args.n_segments * size[0] * size[1] // (h * w))
    reference = (time.perf_counter() - t) / len(images)
    fn = jax.jit(functools.partial(
        jslic.slic, grid=jslic.grid_for(*size, args.n_segments * size[0] * size[1] // (h * w))))
    batch = np.stack(images)
    fn(batch).block_until_ready()
    times = []
    for _ in range(3):
      t = time.perf_counter()
      fn(batch).block_until_ready()
      times.append((time.perf_counter() - t) / len(images))
    return reference, statistics.median(times)

  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{args.images} CamVid val frames, n_segments={args.n_segments}, JAX grid {grid}")
  print("method    superpixels  boundary recall  under-seg. error")
  for name, values in rows.items():
    recall, error, count = (statistics.mean(v) for v in zip(*values))
    print(f"{name:9s} {count:11.0f}  {recall:15.4f}  {error:16.4f}")
  for size in ((h, w), (512, 1024)):
    reference, mine = speed(size)
    print(f"{size[0]}x{size[1]}: skimage {reference * 1e3:.0f} ms/image, JAX "
          f"{mine * 1e3:.0f} ms/image (batch {args.batch_size}), {reference / mine:.1f}x")


if __name__ == "__main__":
  main()
