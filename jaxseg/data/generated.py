"""Generated (image, label map) pairs on disk, and training on real + generated data.

A GAN's pairs are written like a dataset of their own:

    DIR/images/000000.png   DIR/labels/000000.png   DIR/meta.json

`meta.json` holds the class names, palette, ignore index and count, so that `GeneratedPairs`
reads back a source with the same class metadata as the one the label maps came from. Each
file is written to a temporary name and renamed, and `meta.json` last: a crash leaves a
directory that either reads as the pairs finished so far or not at all.
`jaxseg.data.sources.ConcatSource` joins a real source and generated pairs for training.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from jaxseg.data.files import FileSource, read_pair
from jaxseg.errors import JaxsegError


def _save_png(path: str, array: np.ndarray) -> None:
  tmp = f"{path}.tmp-{os.getpid()}.png"
  Image.fromarray(array).save(tmp)
  os.replace(tmp, path)


def write_pairs(directory: str, images: np.ndarray, labels: np.ndarray, *,
                class_names: Sequence[str], palette: np.ndarray, ignore_index: int = 255,
                start: int = 0, info: dict[str, Any] | None = None) -> int:
  """Writes uint8 images (N, H, W, 3) and label maps (N, H, W) as pairs start..start+N-1;
  returns the new count. Call again with `start` = the count to append. `info` (JSON) is kept
  in meta.json, e.g. how the pairs were made."""
  if len(images) != len(labels) or images.shape[1:3] != labels.shape[1:3]:
    raise JaxsegError(f"images {images.shape} and labels {labels.shape} do not pair up")
  for sub in ("images", "labels"):
    os.makedirs(os.path.join(directory, sub), exist_ok=True)
  for i, (image, label) in enumerate(zip(images, labels), start):
    _save_png(os.path.join(directory, "images", f"{i:06d}.png"), np.asarray(image, np.uint8))
    _save_png(os.path.join(directory, "labels", f"{i:06d}.png"), np.asarray(label, np.uint8))
  count = start + len(images)
  meta = {"class_names": list(class_names), "palette": np.asarray(palette).tolist(),
          "ignore_index": int(ignore_index), "count": count, "info": info or {}}
  tmp = os.path.join(directory, f"meta.json.tmp-{os.getpid()}")
  with open(tmp, "w") as f:
    json.dump(meta, f)
  os.replace(tmp, os.path.join(directory, "meta.json"))
  return count


class GeneratedPairs(FileSource):
  """The pairs `write_pairs` wrote to `directory` (the first meta.json["count"])."""

  def __init__(self, directory: str):
    self.directory = os.path.abspath(directory)
    path = os.path.join(self.directory, "meta.json")
    if not os.path.isfile(path):
      raise JaxsegError(f"{path}: missing (not a directory of generated pairs)")
    with open(path) as f:
      meta = json.load(f)
    self.class_names = tuple(meta["class_names"])
    self.palette = np.asarray(meta["palette"], np.uint8)
    self.ignore_index = int(meta["ignore_index"])
    self.info = meta.get("info", {})
    records = [(os.path.join(self.directory, "images", f"{i:06d}.png"),
                os.path.join(self.directory, "labels", f"{i:06d}.png"))
               for i in range(meta["count"])]
    for image_path, label_path in records:
      for p in (image_path, label_path):
        if not os.path.isfile(p):
          raise JaxsegError(f"{p}: missing ({path} lists {meta['count']} pairs)")
    super().__init__(records, description=f"GeneratedPairs({self.directory!r}, "
                                          f"count={meta['count']})")

  def load(self, record):
    image_path, label_path = record
    return read_pair(image_path, label_path)
