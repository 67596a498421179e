"""How long jaxseg takes to compute a train split's statistics (per-channel mean/std and pixels
per class: `data.normalize` of non-RGB data, `train.class_weights=auto`), the one pass over
the data a run on your own data makes before training (then cached in the workdir).

    python benchmarks/data_statistics.py --data_dir=../shared/data/camvid

Reads CamVid's train split through its reader and, side by side, through a folder-dataset
copy with colour-coded masks (written to a temporary directory first), so the ratio shows
what colour decoding costs.
"""

import argparse
import os
import tempfile
import time

import numpy as np

from jaxseg.data import get_dataset, stats, to_folder


def timed(source, repeats: int):
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    result = stats.compute(source, desc=None)
    seconds.append(time.perf_counter() - start)
  return min(seconds), result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", default="../shared/data/camvid", help="CamVid's root")
  parser.add_argument("--repeats", type=int, default=3, help="best of this many passes")
  args = parser.parse_args()
  camvid = get_dataset("camvid", "train", data_dir=args.data_dir)
  with tempfile.TemporaryDirectory() as folder:
    to_folder.export("camvid", folder, data_dir=args.data_dir, splits=("train",),
                     masks="colour")
    # No masks/val in this copy: 10% of train is held out as val, as a user's folder would.
    own = get_dataset("folder", "train", data_dir=folder, val_fraction=0.1)
    rows = {"camvid reader": timed(camvid, args.repeats),
            "folder, colour masks (90% of train)": timed(own, args.repeats)}
  print(f"{os.cpu_count()} CPU cores; best of {args.repeats}")
  print(f"{'source':38s} {'images':>6s} {'seconds':>8s} {'images/s':>9s}")
  for name, (seconds, result) in rows.items():
    print(f"{name:38s} {result['examples']:6d} {seconds:8.2f} {result['examples'] / seconds:9.1f}")
  _, result = rows["camvid reader"]
  print("mean", np.round(result["mean"], 2).tolist(), "std", np.round(result["std"], 2).tolist())
  print("median-frequency weights",
        np.round(stats.median_frequency_weights(result), 3).tolist())


if __name__ == "__main__":
  main()
