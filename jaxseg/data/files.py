"""Reading images and label maps from disk, and the contract every on-disk dataset follows.

Images come out as uint8 (H, W, 3) RGB whatever the file holds (grayscale, palette, RGBA,
CMYK, 16-bit); label maps as uint8 (H, W) class ids. Anything that cannot be read that way
raises `BadExample` naming the file, never a half-decoded image: PIL's
`LOAD_TRUNCATED_IMAGES` would grey-fill a truncated file, so it is refused here even if some
other library in the process turned it on.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Sequence

import numpy as np
from absl import logging
from PIL import Image, ImageFile

from jaxseg.errors import JaxsegError

# Returned by a source in place of an example when it skips bad examples; the pipeline drops
# it (pipeline.DropBadExamples), logs it and counts it.
BAD_KEY = "bad_example"


class BadExample(JaxsegError):
  """One example cannot be read; the message names the file (and annotation id)."""


def _open(path: str, what: str) -> Image.Image:
  try:
    size = os.path.getsize(path)
  except OSError as e:
    raise BadExample(f"{path}: {what} file is missing ({e.strerror})") from None
  if size == 0:
    raise BadExample(f"{path}: {what} file is empty (0 bytes)")
  try:
    return Image.open(path)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise BadExample(f"{path}: not a readable {what} ({e})") from None


_TRUNCATED_LOCK = threading.Lock()


def _load(image: Image.Image, path: str, what: str) -> Image.Image:
  """Decodes fully; truncated or corrupt data is an error, never grey fill.

  PIL's switch for grey fill is a global. It is normally off and left alone (grain decodes in
  several threads at once); if some other library turned it on, it is turned off around each
  decode under a lock, which serialises our decodes only in that case.
  """
  try:
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
      image.load()
    else:
      with _TRUNCATED_LOCK:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
          image.load()
        finally:
          ImageFile.LOAD_TRUNCATED_IMAGES = True
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise BadExample(f"{path}: corrupt or truncated {what} ({e})") from None
  return image


def image_size(path: str, what: str = "image") -> tuple[int, int]:
  """(height, width) from the file header only (cheap: nothing is decoded)."""
  with _open(path, what) as image:
    return image.height, image.width


def read_image(path: str) -> np.ndarray:
  """uint8 (H, W, 3) RGB from any image file PIL reads."""
  with _open(path, "image") as image:
    image = _load(image, path, "image")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: scale to 8 bits, not clip
      array = np.asarray(image, np.uint32)
      peak = 65535 if image.mode.startswith("I;16") else max(int(array.max()), 1)
      grey = (array * 255 // peak).astype(np.uint8)
      return np.repeat(grey[..., None], 3, axis=-1)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
      # Alpha is dropped, not composited: the colour under a transparent pixel is still the
      # photograph's colour in every segmentation dataset we know of.
      image = image.convert("RGBA")
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), np.uint8))


def read_label(path: str) -> np.ndarray:
  """uint8 (H, W) class ids from a single-channel (L or palette) PNG; the palette is ignored."""
  with _open(path, "label") as image:
    image = _load(image, path, "label")
    if image.mode in ("L", "P", "1"):
      return np.asarray(image, np.uint8).copy()
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):
      array = np.asarray(image)
      if array.size and (int(array.max()) > 255 or int(array.min()) < 0):
        raise BadExample(f"{path}: label values {int(array.min())}..{int(array.max())} do not "
                         "fit the uint8 class ids jaxseg uses")
      return array.astype(np.uint8)
    raise BadExample(f"{path}: label has mode {image.mode} ({len(image.getbands())} channels); "
                     "expected a single-channel map of class ids (colour-coded labels must be "
                     "converted to ids first)")


def read_pair(image_path: str, label_path: str, *, lut: np.ndarray | None = None,
              name: str = "") -> dict[str, Any]:
  """{"image", "label", "name"}; `lut` (256 entries) maps raw label values to class ids."""
  image = read_image(image_path)
  label = read_label(label_path)
  if label.shape != image.shape[:2]:
    raise BadExample(f"{label_path}: label is {label.shape[1]}x{label.shape[0]} but its image "
                     f"{image_path} is {image.shape[1]}x{image.shape[0]} (WxH)")
  if lut is not None:
    label = lut[label]
  return {"image": image, "label": label, "name": name or os.path.basename(image_path)}


def check_label_range(label: np.ndarray, num_classes: int, ignore_index: int, where: str):
  """Raises BadExample for values outside [0, num_classes) other than `ignore_index`."""
  bad = (label >= num_classes) & (label != ignore_index)
  if bad.any():
    values = np.unique(label[bad]).tolist()
    raise BadExample(f"{where}: label values {values[:8]} are outside 0..{num_classes - 1} and "
                     f"not the ignore index {ignore_index}; fix the labels or the dataset's "
                     "class count")


class FileSource:
  """Base of the on-disk readers: a grain RandomAccessDataSource over a list of records.

  Subclasses set `class_names`, `palette`, `ignore_index` and implement `load(record)`
  returning {"image", "label", "name"}. With `skip_bad_examples`, an example that raises
  `BadExample` comes back as {BAD_KEY: message} for the pipeline to drop, and records rejected
  while listing the dataset are kept in `skipped` (message per record) for the run summary.
  """

  class_names: Sequence[str] = ()
  palette: np.ndarray = np.zeros((0, 3), np.uint8)
  ignore_index: int = 255

  def __init__(self, records: Sequence[Any], *, skip_bad_examples: bool = False,
               skipped: Sequence[str] = (), description: str = ""):
    self._records = list(records)
    self.skip_bad_examples = bool(skip_bad_examples)
    self.skipped = list(skipped)
    self._description = description
    for message in self.skipped:
      logging.warning("skipped: %s", message)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return len(self._records)

  def __repr__(self) -> str:
    # Grain compares this string when restoring an iterator: what the data is (constructor
    # arguments and the number of examples listed), not whether bad ones would be skipped.
    return self._description

  def load(self, record) -> dict[str, Any]:
    raise NotImplementedError

  def image_file(self, index: int) -> str:
    """The image file of example `index` (prepare stores JPEGs as they are, not re-encoded).

    Records of (image path, label path) pairs need nothing more; other readers override it.
    """
    return self._records[index][0]

  def __getitem__(self, index) -> dict[str, Any]:
    record = self._records[index]
    try:
      example = self.load(record)
      check_label_range(example["label"], self.num_classes, self.ignore_index,
                        example.get("label_file", example["name"]))
      example.pop("label_file", None)
      return example
    except BadExample as e:
      if not self.skip_bad_examples:
        raise
      return {BAD_KEY: str(e)}


def list_pairs(image_dir: str, label_dir: str, label_name: Callable[[str], str | None], *,
               image_suffixes: Sequence[str], what: str, skip_bad_examples: bool
               ) -> tuple[list[tuple[str, str]], list[str]]:
  """Sorted (image, label) paths under `image_dir` (recursively) and the skip messages.

  `label_name(relative image path)` gives the label's path relative to `label_dir`, or None
  for files that are not images of this dataset. A missing label file is an error naming it,
  or a skipped example.
  """
  if not os.path.isdir(image_dir):
    raise JaxsegError(f"{image_dir}: no such directory ({what} images)")
  pairs, skipped = [], []
  for root, dirs, files in os.walk(image_dir):
    dirs.sort()
    for file in sorted(files):
      if not file.lower().endswith(tuple(s.lower() for s in image_suffixes)):
        continue
      image_path = os.path.join(root, file)
      relative = os.path.relpath(image_path, image_dir)
      label_rel = label_name(relative)
      if label_rel is None:
        continue
      label_path = os.path.join(label_dir, label_rel)
      if not os.path.isfile(label_path):
        message = f"{label_path}: label file is missing (image {image_path})"
        if not skip_bad_examples:
          raise BadExample(message + "; pass skip_bad_examples to train without it")
        skipped.append(message)
        continue
      pairs.append((image_path, label_path))
  if not pairs:
    raise JaxsegError(f"{image_dir}: no {what} images with labels found "
                      f"(looked for {', '.join(image_suffixes)} files)")
  return pairs, skipped
