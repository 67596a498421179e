"""Your own data: a folder of images and masks with a class file (`--dataset=folder`).

    DIR/classes.json            {"names": [...], "palette": [[R, G, B], ...],       (optional)
                                 "ignore_index": 255, "ignore_color": [R, G, B],   (optional)
                                 "binary": false}                                  (optional)
    DIR/images/<split>/NAME.{png,jpg,jpeg,tif,tiff,npy}
    DIR/masks/<split>/NAME.png  (the same NAME as its image; subfolders are allowed)

Masks hold class ids (one channel: grey or palette-mode PNG), or colours of the palette
(RGB), `ignore_color` meaning `ignore_index`. Binary masks are two classes: 0/1 as they are;
0/255 when the file says `"binary": true` (255 is otherwise the ignore value, so the file
must say which it means). Images have any number of channels, uint8, uint16 or float
(files.read_array); every image of a split has the same channel count and dtype.

Without masks/val, a seeded fraction of train (`val_fraction`, `seed`) is val and the rest
train: the same names on every run with the same files. docs/own_data.md is the guide.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
from typing import Any

import numpy as np
import tqdm

from jaxseg.data.files import (BadExample, FileSource, ImageInfo, probe_array, read_array,
                               read_label, _load, _open)
from jaxseg.errors import JaxsegError

CLASS_FILE = "classes.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy")
MASK_SUFFIX = ".png"
SPLITS = ("train", "val", "test")
_KEYS = ("names", "palette", "ignore_index", "ignore_color", "binary")


def default_palette(num_classes: int) -> np.ndarray:
  """uint8 (K, 3): Pascal VOC's colour map (the bits of the class id spread over R, G, B),
  which every segmentation viewer knows; class 0 is black."""
  ids = np.arange(num_classes)
  palette = np.zeros((num_classes, 3), np.int64)
  for shift in range(8):
    for channel in range(3):
      palette[:, channel] |= ((ids >> (3 * shift + channel)) & 1) << (7 - shift)
  return palette.astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class ClassFile:
  """DIR/classes.json, checked."""
  names: tuple[str, ...]
  palette: np.ndarray | None  # uint8 (K, 3) when masks may be colour-coded
  ignore_index: int = 255
  ignore_color: tuple[int, int, int] | None = None
  binary: bool = False

  @property
  def colours(self) -> np.ndarray:
    return self.palette if self.palette is not None else default_palette(len(self.names))


def _rgb(value, where: str) -> tuple[int, int, int]:
  if (not isinstance(value, (list, tuple)) or len(value) != 3
      or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255
                 for v in value)):
    raise JaxsegError(f"{where} must be [R, G, B] with integers 0..255, got {value!r}")
  return tuple(value)


def read_class_file(data_dir: str) -> ClassFile:
  """DIR/classes.json; one line names the file and what is wrong with it."""
  path = os.path.join(data_dir, CLASS_FILE)
  if not os.path.isfile(path):
    raise JaxsegError(_missing_class_file(data_dir))
  try:
    with open(path, encoding="utf-8") as f:
      spec = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise JaxsegError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(spec, dict) or "names" not in spec:
    raise JaxsegError(f'{path}: has no "names" (the list of class names, in class-id order)')
  unknown = sorted(set(spec) - set(_KEYS))
  if unknown:
    raise JaxsegError(f"{path}: unknown key {unknown[0]!r}; the keys are {', '.join(_KEYS)}")
  names = spec["names"]
  if (not isinstance(names, list) or not names
      or not all(isinstance(n, str) and n for n in names)):
    raise JaxsegError(f'{path}: "names" must be a non-empty list of strings')
  if len(set(names)) != len(names):
    raise JaxsegError(f'{path}: "names" repeats {next(n for n in names if names.count(n) > 1)!r}')
  if len(names) > 255:
    raise JaxsegError(f"{path}: {len(names)} classes; at most 255 fit the uint8 masks jaxseg "
                      "reads (ids 0..254, and an ignore value)")
  binary = spec.get("binary", False)
  if not isinstance(binary, bool):
    raise JaxsegError(f'{path}: "binary" must be true or false, got {binary!r}')
  if binary and len(names) != 2:
    raise JaxsegError(f'{path}: "binary": true needs exactly 2 names (background first), got '
                      f"{len(names)}")
  ignore = spec.get("ignore_index", 255)
  if not isinstance(ignore, int) or isinstance(ignore, bool) or not 0 <= ignore <= 255:
    raise JaxsegError(f'{path}: "ignore_index" must be an integer 0..255, got {ignore!r}')
  if ignore < len(names):
    raise JaxsegError(f'{path}: "ignore_index" {ignore} is a class id (there are '
                      f"{len(names)} classes); use a value from {len(names)} to 255")
  if binary and "ignore_index" in spec and ignore == 255:
    raise JaxsegError(f'{path}: "binary": true makes 255 the foreground; "ignore_index" must '
                      "be another value")
  palette = None
  if spec.get("palette") is not None:
    colours = spec["palette"]
    if not isinstance(colours, list) or len(colours) != len(names):
      raise JaxsegError(f'{path}: "palette" must list one [R, G, B] per name ({len(names)}), '
                        f"got {len(colours) if isinstance(colours, list) else colours!r}")
    palette = np.array([_rgb(c, f'{path}: "palette"[{i}]') for i, c in enumerate(colours)],
                       np.uint8)
    keys = [tuple(c) for c in palette.tolist()]
    if len(set(keys)) != len(keys):
      raise JaxsegError(f'{path}: "palette" gives two classes the colour '
                        f"{next(k for k in keys if keys.count(k) > 1)}")
  ignore_color = spec.get("ignore_color")
  if ignore_color is not None:
    ignore_color = _rgb(ignore_color, f'{path}: "ignore_color"')
    if palette is not None and list(ignore_color) in palette.tolist():
      raise JaxsegError(f'{path}: "ignore_color" {list(ignore_color)} is also a class colour')
  return ClassFile(tuple(names), palette, ignore, ignore_color, binary)


def _missing_class_file(data_dir: str, limit: int = 200) -> str:
  """The one line that says what to write, with the ids (or colours) the train masks hold."""
  path = os.path.join(data_dir, CLASS_FILE)
  masks = []
  for root, dirs, files in os.walk(os.path.join(data_dir, "masks", "train")):
    dirs.sort()
    masks += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(MASK_SUFFIX)]
  ids, colours = set(), 0
  for mask in masks[:limit]:
    try:
      ids.update(np.unique(read_label(mask)).tolist())
    except BadExample:
      colours += 1
  found = ""
  if ids:
    shown = sorted(ids)
    found = (f" (the first {min(len(masks), limit)} train masks hold ids "
             f"{shown if len(shown) <= 20 else shown[:20] + ['...']})")
    k = max(i for i in ids if i != 255) + 1 if ids - {255} else 1
    example = json.dumps({"names": [f"class{i}" for i in range(min(k, 3))]})[:-2]
    example += ', ...]}' if k > 3 else "]}"
    if ids == {0, 255}:  # binary masks: 255 must be said to be the foreground
      example = '{"names": ["background", "foreground"], "binary": true}'
  elif colours:
    example = '{"names": [...], "palette": [[R, G, B], ...]}'
    found = " (the train masks are colour-coded: give each class its colour)"
  else:
    example = '{"names": [...]}'
  return f"{path} is missing; write {example} there{found}; see docs/own_data.md"


def _stems(directory: str, suffixes, what: str) -> dict[str, str]:
  """{relative path without suffix: path} of the files under `directory` with `suffixes`."""
  found: dict[str, str] = {}
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    for file in sorted(files):
      stem, suffix = os.path.splitext(file)
      if suffix.lower() not in suffixes:
        continue
      key = os.path.relpath(os.path.join(root, stem), directory)
      if key in found:
        raise JaxsegError(f"{os.path.join(root, file)}: a second {what} named {key!r} (also "
                          f"{found[key]}); one file per name")
      found[key] = os.path.join(root, file)
  return found


def list_split(data_dir: str, split: str, *, skip_bad_examples: bool = False
               ) -> tuple[list[tuple[str, str]], list[str]]:
  """Sorted (image, mask) paths of images/<split> and masks/<split>, and the skip messages."""
  image_dir = os.path.join(data_dir, "images", split)
  mask_dir = os.path.join(data_dir, "masks", split)
  for directory in (image_dir, mask_dir):
    if not os.path.isdir(directory):
      raise JaxsegError(f"{directory}: no such directory (folder dataset, split {split}); "
                        "see docs/own_data.md for the layout")
  images = _stems(image_dir, IMAGE_SUFFIXES, "image")
  masks = _stems(mask_dir, (MASK_SUFFIX,), "mask")
  skipped = []
  for key in sorted(set(images) ^ set(masks)):
    if key in images:
      message = (f"{images[key]}: image has no mask (looked for "
                 f"{os.path.join(mask_dir, key + MASK_SUFFIX)})")
    else:
      message = f"{masks[key]}: mask has no image ({os.path.join(image_dir, key)}.* is missing)"
    if not skip_bad_examples:
      raise BadExample(message + "; pass --config.data.skip_bad_examples=True to train "
                       "without it")
    skipped.append(message)
  pairs = [(images[k], masks[k]) for k in sorted(set(images) & set(masks))]
  if not pairs:
    raise JaxsegError(f"{image_dir}: split {split} is empty (no image with a mask; images are "
                      f"{', '.join(IMAGE_SUFFIXES)}, masks {MASK_SUFFIX})")
  return pairs, skipped


def one_format(pairs, skipped: list[str], skip_bad_examples: bool):
  """(pairs, their ImageInfos, (channels, dtype)): every image's header read (a thread per
  file's wait), and the split's one format the one most images have; an image of another is
  an error naming it, or skipped (appended to `skipped`)."""
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    infos = list(tqdm.tqdm(pool.map(lambda pair: _probe(pair[0]), pairs), total=len(pairs),
                           desc="reading image headers", unit="image", leave=False,
                           disable=len(pairs) < 2000, mininterval=1.0))
  formats = collections.Counter((i.channels, i.dtype) for i in infos if isinstance(i, ImageInfo))
  if not formats:
    raise BadExample(infos[0] if isinstance(infos[0], str) else "no readable image")
  (channels, dtype), count = formats.most_common(1)[0]
  kept_pairs, kept_infos = [], []
  for pair, info in zip(pairs, infos):
    if isinstance(info, ImageInfo) and (info.channels, info.dtype) == (channels, dtype):
      kept_pairs.append(pair)
      kept_infos.append(info)
      continue
    message = info if isinstance(info, str) else (
        f"{pair[0]}: image has {info.channels} channel(s) of {info.dtype.name}, but {count} of "
        f"the split's {len(pairs)} images have {channels} of {dtype.name}; every image of a "
        "split must match")
    if not skip_bad_examples:
      raise BadExample(message)
    skipped.append(message)
  return kept_pairs, kept_infos, (channels, dtype)


def _probe(path: str) -> ImageInfo | str:
  try:
    return probe_array(path)
  except BadExample as e:
    return str(e)


def held_out(count: int, fraction: float, seed: int) -> np.ndarray:
  """Sorted indices of the `fraction` of `count` examples that make up a derived val split:
  a permutation seeded by `seed`, so the same files give the same split on every run."""
  if not 0.0 < fraction < 1.0:
    raise JaxsegError(f"--config.data.val_fraction={fraction} must be in (0, 1) (there is no "
                      "masks/val to evaluate on)")
  n_val = min(max(1, round(count * fraction)), count - 1)
  if n_val < 1:
    raise JaxsegError(f"--config.data.val_fraction: the train split has {count} example(s); "
                      "at least 2 are needed to hold one out for val (or add masks/val)")
  return np.sort(np.random.default_rng(seed).permutation(count)[:n_val])


class FolderDataset(FileSource):
  """A folder of images and masks with DIR/classes.json; a grain RandomAccessDataSource."""

  def __init__(self, split: str = "train", *, data_dir: str, val_fraction: float = 0.1,
               seed: int = 0, skip_bad_examples: bool = False):
    if split not in SPLITS:
      raise JaxsegError(f"unknown folder-dataset split {split!r}; valid splits: "
                        f"{', '.join(SPLITS)}")
    if not data_dir or not os.path.isdir(data_dir):
      raise JaxsegError(f"--data_dir={data_dir}: no such directory (a folder dataset holds "
                        "classes.json, images/ and masks/)")
    self.split, self.data_dir = split, os.path.abspath(data_dir)
    self.classes = read_class_file(self.data_dir)
    self.class_names = self.classes.names
    self.palette = self.classes.colours
    self.ignore_index = self.classes.ignore_index
    derived = split != "test" and not os.path.isdir(os.path.join(self.data_dir, "masks", "val"))
    listed = "train" if derived else split
    pairs, skipped = list_split(self.data_dir, listed, skip_bad_examples=skip_bad_examples)
    pairs, infos, (self.in_channels, self.image_dtype) = one_format(
        pairs, skipped, skip_bad_examples)
    description = f"FolderDataset(split={split!r}, data_dir={self.data_dir!r}"
    if derived:
      val = held_out(len(pairs), val_fraction, seed)
      keep = set(val.tolist()) if split == "val" else set(range(len(pairs))) - set(val.tolist())
      pairs = [p for i, p in enumerate(pairs) if i in keep]
      infos = [info for i, info in enumerate(infos) if i in keep]
      description += f", val_fraction={val_fraction}, seed={seed}"
    self.image_sizes = [info.size for info in infos]  # (h, w) of each example, from headers
    self.val_fraction, self.seed, self.derived_val = val_fraction, seed, derived
    self._mask_lut = self._lut()
    self._colour_table = _colour_table(self.classes)
    super().__init__(pairs, skip_bad_examples=skip_bad_examples, skipped=skipped,
                     description=description + f", examples={len(pairs)})")

  def _lut(self) -> np.ndarray:
    lut = np.arange(256, dtype=np.uint8)
    if self.classes.binary:
      lut[255] = 1
    return lut

  def load(self, record) -> dict[str, Any]:
    image_path, mask_path = record
    image = read_array(image_path)
    if image.shape[-1] != self.in_channels or image.dtype != self.image_dtype:
      # (its header said otherwise: a file changed since the split was listed)
      raise BadExample(f"{image_path}: image has {image.shape[-1]} channel(s) of "
                       f"{image.dtype}, but the split's images have {self.in_channels} of "
                       f"{self.image_dtype.name}; every image of a split must match")
    label = self.read_mask(mask_path)
    if label.shape != image.shape[:2]:
      raise BadExample(f"{mask_path}: mask is {label.shape[1]}x{label.shape[0]} but its image "
                       f"{image_path} is {image.shape[1]}x{image.shape[0]} (WxH)")
    name = os.path.relpath(os.path.splitext(image_path)[0],
                           os.path.join(self.data_dir, "images", self._split_dir))
    return {"image": image, "label": label, "name": name, "label_file": mask_path}

  @property
  def _split_dir(self) -> str:
    return "train" if self.derived_val else self.split

  def read_mask(self, path: str) -> np.ndarray:
    """uint8 (H, W) class ids of one mask file: ids as they are (binary 255 -> 1), colours
    through the palette."""
    with _open(path, "mask") as image:
      image = _load(image, path, "mask")
      if image.mode in ("RGB", "RGBA"):
        return self._decode_colours(np.asarray(image.convert("RGB")), path)
      if image.mode == "P" and self._colour_table is not None and not self._ids_agree(image):
        # A palette PNG whose colours are not classes.json's at its indices (an image editor
        # reordered them): the colours, which the user sees, say what each pixel is.
        return self._decode_colours(np.asarray(image.convert("RGB")), path)
    return self._mask_lut[read_label(path)]

  def _ids_agree(self, image) -> bool:
    """Whether a palette-mode mask's colours at the indices it uses are classes.json's colours
    of those class ids (so its indices are the class ids, as in Pascal VOC's masks)."""
    used = np.unique(np.asarray(image))
    colours = np.asarray(image.getpalette() or [], np.uint8).reshape(-1, 3)
    if used.max(initial=0) >= len(colours):
      return True  # no colour to compare with: the indices are all there is
    k = len(self.classes.names)
    ours = self.classes.palette
    return all(i == self.ignore_index or (i < k and tuple(colours[i]) == tuple(ours[i]))
               for i in used.tolist())

  def _decode_colours(self, rgb: np.ndarray, path: str) -> np.ndarray:
    if self._colour_table is None:
      raise BadExample(f"{path}: mask is colour-coded (RGB) but {CLASS_FILE} has no "
                       '"palette"; add one colour per class, or save masks as class ids')
    # A binary search among the few palette colours per pixel: no sort of the pixels.
    keys = _colour_keys(rgb)
    known_keys, ids = self._colour_table
    where = np.minimum(np.searchsorted(known_keys, keys), len(known_keys) - 1)
    known = known_keys[where] == keys
    if not known.all():
      unknown, counts = np.unique(keys[~known], return_counts=True)
      key, count = int(unknown[0]), int(counts[0])
      colour = [key >> 16, (key >> 8) & 255, key & 255]
      raise BadExample(f"{path}: colour {colour} ({count} pixels) is not in the "
                       f'"palette" of {os.path.join(self.data_dir, CLASS_FILE)}'
                       + ("" if self.classes.ignore_color else
                          ' (set "ignore_color" if it marks pixels to ignore)'))
    return ids[where]


def _colour_table(classes: ClassFile) -> tuple[np.ndarray, np.ndarray] | None:
  """(sorted colour keys, the class id of each) of the palette and the ignore colour, or None
  without a palette: what colour masks are decoded by (a binary search per pixel)."""
  if classes.palette is None:
    return None
  colours = [*np.asarray(classes.palette).tolist(), *([classes.ignore_color]
                                                      if classes.ignore_color else [])]
  ids = [*range(len(classes.palette)), *([classes.ignore_index] if classes.ignore_color else [])]
  keys = _colour_keys(np.array(colours))
  order = np.argsort(keys)
  return keys[order], np.asarray(ids, np.uint8)[order]


def _colour_keys(rgb: np.ndarray) -> np.ndarray:
  """One int per colour (R << 16 | G << 8 | B) of uint8 (..., 3)."""
  rgb = np.asarray(rgb, np.int64)
  return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]

