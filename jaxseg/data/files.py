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
from typing import Any, Callable, NamedTuple, Sequence

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


# What a multi-band image may hold, and the dtype it is kept in: integers up to 16 bits as they
# are (uint16 crosses to the device at half the size of float32), everything else as float32.
_KEPT_DTYPES = (np.uint8, np.uint16, np.float32)
_PIL_ARRAY_MODES = {"L": 1, "RGB": 3, "I;16": 1, "I;16B": 1, "I;16L": 1, "I": 1, "F": 1}


def _as_hwc(array: np.ndarray, path: str) -> np.ndarray:
  """(H, W) or (H, W, C) in uint8, uint16 or float32; other dtypes converted, refused if not
  numbers."""
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3:
    raise BadExample(f"{path}: image array has shape {array.shape}; expected (H, W) or "
                     "(H, W, C) with channels last")
  if array.dtype == np.bool_ or not (np.issubdtype(array.dtype, np.integer)
                                    or np.issubdtype(array.dtype, np.floating)):
    raise BadExample(f"{path}: image dtype {array.dtype} is not a number type")
  if array.dtype.type not in _KEPT_DTYPES:
    array = array.astype(np.float32)
  return np.ascontiguousarray(array)


def _tiff_permutation(shape, axes: str, shaped: bool, path: str) -> list[int]:
  """The transpose that makes a TIFF series (H, W) or (H, W, C).

  tifffile names axes: Y, X rows and columns; S samples (bands interleaved, or planar as GDAL
  writes them); Q, I, C pages or planes. Files tifffile itself wrote (`shaped`) without an S
  axis hold the array as it was given to `imwrite`, which stores a 3-D array that is not RGB
  as pages of its last two axes: (C, H, W) and (H, W, C) both come out as Q, Y, X. The smaller
  of the first and last axes is taken for the bands (a 13-band tile is 13 x 256 x 256 or
  256 x 256 x 13, never 256 x 13 x 256).
  """
  if len(shape) == 2 and axes.endswith("YX"):
    return [0, 1]
  if len(shape) != 3 or "Y" not in axes or "X" not in axes:
    raise BadExample(f"{path}: TIFF axes {axes} (shape {tuple(shape)}); expected one image of "
                     "rows, columns and bands")
  if "S" not in axes and shaped:
    return [1, 2, 0] if shape[0] <= shape[2] else [0, 1, 2]
  rest = [i for i, a in enumerate(axes) if a not in "YX"]
  return [axes.index("Y"), axes.index("X"), *rest]


def _tiff(path: str, pixels: bool):
  """(array or None, shape, dtype, permutation) of a TIFF's first series."""
  import tifffile  # pylint: disable=g-import-not-at-top  # only folder datasets read TIFFs
  try:
    with tifffile.TiffFile(path) as tif:
      series = tif.series[0]
      shape, axes, dtype = tuple(series.shape), series.axes, series.dtype
      # squeeze: tifffile may add length-1 axes (one page, one sample) around the image.
      kept = [i for i, n in enumerate(shape) if n != 1 or axes[i] in "YX"]
      array = series.asarray().reshape([shape[i] for i in kept]) if pixels else None
      shape, axes = tuple(shape[i] for i in kept), "".join(axes[i] for i in kept)
      shaped = tif.is_shaped
  except (OSError, ValueError, KeyError, IndexError, tifffile.TiffFileError) as e:
    raise BadExample(f"{path}: not a readable TIFF ({e})") from None
  return array, shape, dtype, _tiff_permutation(shape, axes, shaped, path)


def read_array(path: str) -> np.ndarray:
  """(H, W, C) image of any channel count: uint8, uint16 or float32 as the file holds it.

  .npy arrays are channels last; TIFFs (tifffile) may be interleaved or planar; other files go
  through PIL: grey and 16-bit grey are one channel, palette images their RGB colours, alpha
  is dropped (as `read_image` does). The folder datasets read images this way.
  """
  suffix = os.path.splitext(path)[1].lower()
  if suffix == ".npy":
    if not os.path.isfile(path):
      raise BadExample(f"{path}: image file is missing")
    try:
      array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise BadExample(f"{path}: not a readable .npy array ({e})") from None
    return _as_hwc(array, path)
  if suffix in (".tif", ".tiff"):
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
      raise BadExample(f"{path}: image file is missing or empty")
    array, _, _, order = _tiff(path, pixels=True)
    return _as_hwc(np.transpose(array, order), path)
  with _open(path, "image") as image:
    image = _load(image, path, "image")
    if image.mode in ("1", "LA"):
      image = image.convert("L")
    elif image.mode not in _PIL_ARRAY_MODES:  # palette, RGBA, CMYK, YCbCr...: RGB
      image = image.convert("RGBA" if "transparency" in image.info else "RGB").convert("RGB")
    array = np.asarray(image)
    if image.mode == "I;16B":
      array = array.astype(np.uint16)
    return _as_hwc(array, path)


class ImageInfo(NamedTuple):
  """What `read_array` will give for a file, read from its header."""
  channels: int
  dtype: np.dtype
  size: tuple[int, int]  # (height, width)


def probe_array(path: str) -> ImageInfo:
  """The channels, dtype and size `read_array` gives for `path`, from its header (PIL, .npy
  and TIFF all have one): a split is checked for one channel count and dtype, and val images
  for one size, before any pixel is decoded."""
  suffix = os.path.splitext(path)[1].lower()
  try:
    if suffix == ".npy":
      array = np.load(path, mmap_mode="r", allow_pickle=False)
      shape, dtype = array.shape, array.dtype
    elif suffix in (".tif", ".tiff"):
      _, shape, dtype, order = _tiff(path, pixels=False)
      shape = tuple(shape[i] for i in order)
    else:
      with _open(path, "image") as image:
        mode, (w, h) = image.mode, image.size
      if mode in ("I;16", "I;16B", "I;16L"):
        return ImageInfo(1, np.dtype(np.uint16), (h, w))
      if mode in ("F", "I"):
        return ImageInfo(1, np.dtype(np.float32), (h, w))
      return ImageInfo(1 if mode in ("L", "1", "LA") else 3, np.dtype(np.uint8), (h, w))
  except BadExample:
    raise
  except Exception as e:  # pylint: disable=broad-except  # any reader's failure, in one line
    raise BadExample(f"{path}: not a readable image ({e})") from None
  channels = 1 if len(shape) == 2 else int(shape[-1])
  dtype = np.dtype(dtype)
  return ImageInfo(channels, dtype if dtype.type in _KEPT_DTYPES else np.dtype(np.float32),
                   (int(shape[0]), int(shape[1])))


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
  """{"image", "label", "name", "label_file"}; `lut` (256 entries) maps raw label values to
  class ids. `label_file` names the label in a range error (FileSource drops it after)."""
  image = read_image(image_path)
  label = read_label(label_path)
  if label.shape != image.shape[:2]:
    raise BadExample(f"{label_path}: label is {label.shape[1]}x{label.shape[0]} but its image "
                     f"{image_path} is {image.shape[1]}x{image.shape[0]} (WxH)")
  if lut is not None:
    label = lut[label]
  return {"image": image, "label": label, "name": name or os.path.basename(image_path),
          "label_file": label_path}


def check_label_range(label: np.ndarray, num_classes: int, ignore_index: int, where: str):
  """Raises BadExample for values outside [0, num_classes) other than `ignore_index`."""
  bad = (label >= num_classes) & (label != ignore_index)
  if bad.any():
    values = np.unique(label[bad]).tolist()
    raise BadExample(f"{where}: label values {values[:8]} are outside 0..{num_classes - 1} and "
                     f"not the ignore index {ignore_index}; fix the labels or the dataset's "
                     "class count")


def channels(source) -> tuple[int, np.dtype]:
  """(channel count, dtype) of a source's images: 3 and uint8 unless it says otherwise (the
  folder datasets, `in_channels` and `image_dtype`)."""
  return (int(getattr(source, "in_channels", 3)),
          np.dtype(getattr(source, "image_dtype", np.uint8)))


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
