"""Reading a dataset written by `python -m jaxseg.data.prepare` (TFDS format, array_record).

    source = PreparedSource("/data/prepared", "train")   # or the dataset's version directory
    source[0]  # {"image": uint8 (H, W, 3), "label": uint8 (H, W), "name": str}

The directory is a plain TFDS dataset, `OUTPUT_DIR/jaxseg_<dataset>/1.0.0/`, so TFDS opens it
too, with no TensorFlow installed: `tfds.data_source("jaxseg_camvid", data_dir=OUTPUT_DIR)` or
`tfds.builder_from_directory(VERSION_DIR).as_data_source()` (labels come out (H, W, 1) there).
The `jaxseg_` prefix keeps TFDS from taking `coco` or `cityscapes` for its own builders.

A split is readable only once every one of its shards is written: `dataset_info.json` lists
finished splits only, and `jaxseg_prepare.json` (the writer's progress record) says which
splits are still being written, so that a reader refuses them with a one-line error telling
how to finish them instead of reading a partial split.
"""

from __future__ import annotations

import io
import json
import operator
import os
import re
from typing import Any

import numpy as np
from PIL import Image

from jaxseg.errors import JaxsegError

# The on-disk format version; a change in what is stored or how bumps it.
VERSION = "1.0.0"
PREFIX = "jaxseg_"
MANIFEST = "jaxseg_prepare.json"  # the writer's arguments and progress, shard by shard
DATASET_INFO = "dataset_info.json"
METADATA = "metadata.json"  # TFDS's free-form metadata: class names, palette, skipped, ...
INSTALL_HINT = "pip install tensorflow-datasets array-record"


def import_tfds():
  """tensorflow_datasets, or a one-line error saying what to install (TensorFlow is not needed)."""
  # pylint: disable=g-import-not-at-top,unused-import
  try:
    import tensorflow_datasets as tfds
    from array_record.python import array_record_module  # TFDS's array_record reader needs it
  except ImportError as e:
    raise JaxsegError(f"prepared datasets need TensorFlow Datasets and ArrayRecord (TensorFlow "
                      f"itself is not needed): {INSTALL_HINT} ({e})") from None
  return tfds


def tfds_name(dataset: str) -> str:
  """The TFDS name of a jaxseg dataset: `camvid` -> `jaxseg_camvid` (a valid snake_case name)."""
  name = re.sub(r"\W", "_", dataset.strip().lower())
  return name if name.startswith(PREFIX) else PREFIX + name


def _read_json(path: str) -> dict[str, Any] | None:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise JaxsegError(f"{path}: unreadable ({e}); the prepared dataset is damaged, prepare it "
                      "again into an empty --output_dir") from None


def _is_version_dir(path: str) -> bool:
  return (os.path.isfile(os.path.join(path, DATASET_INFO))
          or os.path.isfile(os.path.join(path, MANIFEST)))


def resolve(path: str, dataset: str | None = None) -> str:
  """The version directory of a prepared dataset given it, its dataset dir or the output dir.

  `dataset` ("camvid" or "jaxseg_camvid") picks one when an output dir holds several.
  """
  path = os.path.abspath(os.fspath(path))
  want = tfds_name(dataset) if dataset else None
  if not os.path.isdir(path):
    raise JaxsegError(f"{path}: no such directory (a prepared dataset)")
  if _is_version_dir(path):
    name = os.path.basename(os.path.dirname(path))
    if want and name != want:
      raise JaxsegError(f"{path} holds the prepared dataset {name}, not {want}")
    return path
  if _is_version_dir(os.path.join(path, VERSION)):  # the dataset's directory
    return resolve(os.path.join(path, VERSION), dataset)
  # Only jaxseg_* entries are looked into: is_prepared() of a raw data dir with thousands of
  # files must stay cheap.
  candidates = [d for d in os.listdir(path) if d.startswith(PREFIX)]
  found = sorted(d for d in candidates if _is_version_dir(os.path.join(path, d, VERSION)))
  if want:
    if want not in found:
      raise JaxsegError(f"{path} has no prepared dataset {want}"
                        + (f" (it has {', '.join(found)})" if found else "")
                        + "; write it with `python -m jaxseg.data.prepare`")
    found = [want]
  if not found:
    others = [d for d in candidates if os.path.isdir(os.path.join(path, d))
              and any(_is_version_dir(os.path.join(path, d, v)) for v in os.listdir(
                  os.path.join(path, d)))]
    hint = (f" (it has {', '.join(sorted(others))} in a format version other than {VERSION}: "
            "prepare it again with this jaxseg)") if others else ""
    raise JaxsegError(f"{path}: not a prepared dataset (no {DATASET_INFO}){hint}; write one with "
                      "`python -m jaxseg.data.prepare`")
  if len(found) > 1:
    raise JaxsegError(f"{path} holds several prepared datasets ({', '.join(found)}); pass the "
                      f"one to read, e.g. {os.path.join(path, found[0])}")
  return os.path.join(path, found[0], VERSION)


def _state(version_dir: str) -> tuple[dict, dict, dict | None]:
  """(dataset_info, metadata, manifest) of a version dir; the first two {} when absent."""
  info = _read_json(os.path.join(version_dir, DATASET_INFO)) or {}
  metadata = _read_json(os.path.join(version_dir, METADATA)) or {}
  manifest = _read_json(os.path.join(version_dir, MANIFEST))
  return info, metadata, manifest


def _unfinished(manifest: dict | None) -> dict[str, tuple[int, int]]:
  """split -> (shards written, shards in all) for the splits still being written."""
  if not manifest:
    return {}
  return {split: (sum(s is not None for s in state["shards"]), len(state["shards"]))
          for split, state in manifest.get("splits", {}).items() if not state.get("complete")}


def _published(info: dict) -> list[str]:
  return [s["name"] for s in info.get("splits", [])]


def _resume_hint(manifest: dict | None) -> str:
  command = (manifest or {}).get("command")
  return (f"re-run `{command}` to finish it" if command
          else "re-run `python -m jaxseg.data.prepare` with the same arguments to finish it")


def is_prepared(path: str, split: str | None = None, dataset: str | None = None) -> bool:
  """Whether `path` is a completely written prepared dataset (and has `split`, if given).

  False while any split is still being written (after a kill, or a stop at a bad example),
  for directories that are no prepared dataset, and for missing paths; reads only JSON.
  """
  try:
    version_dir = resolve(path, dataset)
    info, metadata, manifest = _state(version_dir)
  except (JaxsegError, OSError):
    return False
  splits = _published(info)
  if not splits or "class_names" not in metadata or _unfinished(manifest):
    return False
  if manifest is not None and set(manifest.get("splits", {})) - set(splits):
    return False  # finished but not yet published: the writer died in between; re-run it
  return split is None or split in splits


def _decode(data: bytes, mode: str) -> np.ndarray:
  """PNG, or the JPEG kept from the source (PIL tells them apart), as uint8 in `mode`."""
  with Image.open(io.BytesIO(data)) as image:
    if image.mode != mode:
      image = image.convert(mode)
    return np.array(image)  # a writable copy


def _writable(array) -> np.ndarray:
  array = np.asarray(array)
  return array if array.flags.writeable else array.copy()


class PreparedSource:
  """One split of a prepared dataset; a grain RandomAccessDataSource.

  Examples are {"image": uint8 (H, W, 3), "label": uint8 (H, W), "name": str}, and the source
  has the class metadata of the dataset it was prepared from (`class_names`, `num_classes`,
  `palette`, `ignore_index`) and `skipped`, the messages of the examples left out while
  preparing. It pickles small (paths only) and reopens the files in each worker process.
  """

  def __init__(self, data_dir: str, split: str, *, dataset: str | None = None):
    self.path = resolve(data_dir, dataset)
    self.split = split
    info, metadata, manifest = _state(self.path)
    unfinished = _unfinished(manifest)
    splits = _published(info)
    if split in unfinished:
      done, total = unfinished[split]
      raise JaxsegError(f"{self.path}: split {split!r} is incomplete ({done} of {total} shards "
                        f"written; preparing it was interrupted or stopped): "
                        f"{_resume_hint(manifest)}")
    if split not in splits:
      if manifest and split in manifest.get("splits", {}):  # written, not yet published
        raise JaxsegError(f"{self.path}: split {split!r} is written but not yet published: "
                          f"{_resume_hint(manifest)}")
      if not splits:
        raise JaxsegError(f"{self.path}: no split is completely written yet: "
                          f"{_resume_hint(manifest)}")
      raise JaxsegError(f"{self.path} has no split {split!r}; prepared splits: "
                        f"{', '.join(splits)}")
    if "class_names" not in metadata:
      raise JaxsegError(f"{self.path}: {METADATA} lacks the class names; this TFDS dataset was "
                        "not written by `python -m jaxseg.data.prepare`")
    split_info = next(s for s in info["splits"] if s["name"] == split)
    self._num_examples = sum(int(n) for n in split_info.get("shardLengths", []))
    self.name = info.get("name", os.path.basename(os.path.dirname(self.path)))
    self.class_names = tuple(metadata["class_names"])
    self.palette = np.asarray(metadata.get("palette", np.zeros((0, 3))), np.uint8).reshape(-1, 3)
    self.ignore_index = int(metadata.get("ignore_index", 255))
    self.in_channels = int(metadata.get("in_channels", 3))
    self.image_dtype = np.dtype(metadata.get("image_dtype", "uint8"))
    self._num_classes = int(metadata.get("num_classes", len(self.class_names)))
    split_meta = metadata.get("splits", {}).get(split, {})
    self.skipped = list(split_meta.get("skipped", []))
    self.source_repr = split_meta.get("source", "")
    self.options = dict(metadata.get("dataset_options") or {})
    self._source = None
    self._open()  # fail here, not in a worker, when a shard is missing

  @property
  def num_classes(self) -> int:
    return self._num_classes

  def check_options(self, options: dict[str, Any], defaults: dict[str, Any] | None = None
                    ) -> None:
    """Reader options a run asks for must be those the dataset was prepared with: a prepared
    COCO of the 80 things cannot become the VOC subset by a flag. An option it was prepared
    without had the reader's default (`defaults`)."""
    prepared_with = {**(defaults or {}), **self.options}
    for key, value in sorted(options.items()):
      if prepared_with.get(key) != value:
        was = (f"{key}={self.options[key]!r}" if key in self.options
               else f"no {key} (the reader's default)")
        raise JaxsegError(f"{self.path} was prepared with {was}, but this run asks for "
                          f"{key}={value!r}; prepare it again with --dataset_options="
                          f"{key}={value} or drop the option")

  def _open(self):
    tfds = import_tfds()
    builder = tfds.builder_from_directory(self.path)
    split_info = builder.info.splits[self.split]
    missing = [os.fspath(p) for p in split_info.filepaths if not os.path.exists(p)]
    if missing:
      raise JaxsegError(f"{missing[0]}: shard file is missing ({len(missing)} of "
                        f"{len(split_info.filepaths)} in split {self.split!r}); the prepared "
                        "dataset is damaged, prepare it again")
    features = builder.info.features
    # Image features are decoded here, with PIL, rather than by TFDS: the same pixels with or
    # without OpenCV installed (which decodes JPEGs slightly differently), and no warning
    # about it in every worker.
    self._image_features = {key for key in ("image", "label")
                 if isinstance(features[key], tfds.features.Image)}
    decoders = {key: tfds.decode.SkipDecoding() for key in self._image_features}
    self._source = builder.as_data_source(split=self.split, decoders=decoders or None)
    return self._source

  def __len__(self) -> int:
    return self._num_examples

  def __repr__(self) -> str:
    # Grain compares this string when restoring an iterator: what the data is, not where it
    # lies, so a dataset moved to another disk still resumes.
    return (f"PreparedSource(name={self.name!r}, version={VERSION!r}, split={self.split!r}, "
            f"num_examples={self._num_examples}, source={self.source_repr!r})")

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_source"] = None  # reopened lazily in the process that reads
    return state

  def __getitem__(self, index) -> dict[str, Any]:
    index = operator.index(index)
    if not 0 <= index < self._num_examples:
      raise IndexError(f"index {index} out of range for {self!r}")
    source = self._source if self._source is not None else self._open()
    raw = source[index]
    image, label = raw["image"], raw["label"]
    image = _decode(image, "RGB") if "image" in self._image_features else _writable(image)
    label = _decode(label, "L") if "label" in self._image_features else _writable(label)
    if label.ndim == 3:
      label = np.ascontiguousarray(label[..., 0])
    name = raw["name"]
    return {"image": image, "label": label,
            "name": name.decode("utf-8") if isinstance(name, bytes) else str(name)}


__all__ = ["PreparedSource", "is_prepared", "resolve", "tfds_name", "VERSION"]
