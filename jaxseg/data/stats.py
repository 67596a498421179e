"""Statistics of a train split, computed once and cached in the run's workdir: per-channel mean
and standard deviation of the images (normalisation of data that is not 8-bit RGB) and pixel
counts per class (median-frequency class weights, `train.class_weights="auto"`).
"""

from __future__ import annotations

import concurrent.futures
import json
import os

import jax
import numpy as np
import tqdm

from jaxseg.data.files import BAD_KEY
from jaxseg.errors import JaxsegError

CACHE_FILE = "data_statistics.json"


def _one(example, num_classes: int):
  """(pixels, per-channel mean, per-channel sum of squared deviations, class pixel counts)."""
  image = np.asarray(example["image"])
  values = image.reshape(-1, image.shape[-1]).astype(np.float64)
  mean = values.mean(axis=0)
  m2 = ((values - mean) ** 2).sum(axis=0)
  counts = np.bincount(np.asarray(example["label"]).ravel(), minlength=256)[:num_classes]
  return len(values), mean, m2, counts


def compute(source, *, desc: str | None = "train statistics") -> dict:
  """One pass over `source` (decoding on a thread per core, with a progress bar).

  Means and variances are merged per image with Chan et al.'s pairwise rule in float64, so
  16-bit and float images lose nothing to cancellation. `class_pixels[k]` counts the pixels
  of class k; `present_pixels[k]` all pixels of the images where class k occurs (Eigen &
  Fergus's frequency denominator). Examples a source skips as bad are left out.
  """
  k = source.num_classes
  n, mean, m2 = 0, None, None
  class_pixels = np.zeros(k, np.int64)
  present_pixels = np.zeros(k, np.int64)
  examples = 0

  def read(i):
    example = source[i]
    return None if BAD_KEY in example else _one(example, k)

  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    for result in tqdm.tqdm(pool.map(read, range(len(source))), total=len(source), desc=desc,
                            unit="image", dynamic_ncols=True, mininterval=1.0,
                            disable=desc is None or jax.process_index() != 0, leave=False):
      if result is None:
        continue
      count, image_mean, image_m2, counts = result
      if mean is None:
        n, mean, m2 = count, image_mean, image_m2
      else:
        delta = image_mean - mean
        total = n + count
        mean = mean + delta * count / total
        m2 = m2 + image_m2 + delta ** 2 * n * count / total
        n = total
      class_pixels += counts
      present_pixels += (counts > 0) * count
      examples += 1
  if not examples:
    raise JaxsegError(f"{source!r}: no readable example to compute statistics from")
  return {"source": repr(source), "examples": examples, "mean": mean.tolist(),
          "std": np.sqrt(m2 / n).tolist(), "class_pixels": class_pixels.tolist(),
          "present_pixels": present_pixels.tolist()}


def cache_key(source) -> str:
  """What the statistics depend on: the data (the source's description: directory, split,
  examples) and how its masks are read (class names, ignore value, a folder dataset's
  classes.json settings), so that editing classes.json invalidates them."""
  classes = getattr(source, "classes", None)
  how = (list(source.class_names), int(source.ignore_index),
         None if classes is None else [classes.binary, classes.ignore_color,
                                       None if classes.palette is None
                                       else classes.palette.tolist()])
  return f"{source!r} {json.dumps(how)}"


def cached(source, workdir: str | None) -> dict:
  """`compute(source)`, read from WORKDIR/data_statistics.json when that file was written for
  the same source (`cache_key`), else computed and written (by way of a temporary file, process 0). A resumed run, `experiments.evaluate` and
  a rerun in the same workdir do not read the split again."""
  path = os.path.join(workdir, CACHE_FILE) if workdir else None
  if path and os.path.exists(path):
    try:
      with open(path, encoding="utf-8") as f:
        stats = json.load(f)
      if stats.get("key") == cache_key(source):
        return stats
    except (OSError, json.JSONDecodeError):
      pass  # a damaged cache is recomputed
  stats = {**compute(source), "key": cache_key(source)}
  if path and jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(stats, f, indent=1)
    os.replace(tmp, path)
  return stats


def median_frequency_weights(stats: dict) -> list[float]:
  """Eigen & Fergus (2015): w_k = median_j f_j / f_k, f_k = class_pixels / present_pixels;
  the median over the classes that occur. A class absent from the train split gets weight 0
  (it has no pixel to weight)."""
  pixels = np.asarray(stats["class_pixels"], np.float64)
  present = np.asarray(stats["present_pixels"], np.float64)
  occurs = pixels > 0
  if not occurs.any():
    raise JaxsegError(f"{stats['source']}: no labelled pixel; class weights cannot be computed")
  freq = np.where(occurs, pixels / np.where(present > 0, present, 1.0), 0.0)
  median = float(np.median(freq[occurs]))
  return np.where(occurs, median / np.where(occurs, freq, 1.0), 0.0).tolist()
