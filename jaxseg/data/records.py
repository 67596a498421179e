"""TFDS records without TensorFlow: examples checked and serialized as tf.Example bytes, and
array_record shards written atomically (the layer under `python -m jaxseg.data.prepare`).

Images are lossless PNG, or the source's own JPEG file where PIL decodes it to exactly the
source's pixels; labels are PNG; `zlib` stores raw pixels compressed instead.
"""

from __future__ import annotations

import io
import multiprocessing
import os
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from jaxseg.data.files import BAD_KEY, BadExample, check_label_range
from jaxseg.data.prepared import import_tfds
from jaxseg.errors import JaxsegError, first_line

ENCODINGS = ("png", "zlib")
# PNG zlib levels: level 1 encodes ~4x faster than the default 6 for ~7% more bytes on photos
# (CamVid: 220 vs 207 kB, 11 vs 45 ms a frame); label maps are small, so they get level 6.
_IMAGE_PNG_LEVEL = 1
_LABEL_PNG_LEVEL = 6


def tfds_features(encoding: str, class_names: Sequence[str], in_channels: int = 3,
                  image_dtype: str = "uint8"):
  """The TFDS features of a prepared dataset: image, label (class ids) and name.

  Images that are not 8-bit RGB (a folder dataset's grey, 16-bit, float or multi-band ones)
  are stored as zlib-compressed raw arrays in either encoding: PNG holds none of 4+ bands or
  floats, and raw arrays keep every value exactly.
  """
  tfds = import_tfds()
  if (in_channels, image_dtype) != (3, "uint8"):
    zlib = tfds.features.Encoding.ZLIB
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(None, None, in_channels),
                                      dtype=np.dtype(image_dtype), encoding=zlib,
                                      doc=f"{in_channels}-channel {image_dtype} image, "
                                          "zlib-compressed raw values"),
        "label": (tfds.features.LabeledImage(
            labels=list(class_names) or None, shape=(None, None, 1), encoding_format="png",
            doc="class id per pixel (ignore_index in the metadata), lossless PNG")
                  if encoding == "png" else
                  tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding=zlib,
                                       doc="class id per pixel, zlib-compressed")),
        "name": tfds.features.Text(doc="the example's file name in the source dataset"),
    })
  if encoding == "png":
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png",
                                     doc="RGB image: lossless PNG, or the source's own "
                                         "JPEG file where that decodes to the same pixels"),
        "label": tfds.features.LabeledImage(
            labels=list(class_names) or None, shape=(None, None, 1), encoding_format="png",
            doc="class id per pixel (ignore_index in the metadata), lossless PNG"),
        "name": tfds.features.Text(doc="the example's file name in the source dataset"),
    })
  if encoding == "zlib":
    zlib = tfds.features.Encoding.ZLIB
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding=zlib,
                                      doc="RGB image, zlib-compressed raw pixels"),
        "label": tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding=zlib,
                                      doc="class id per pixel, zlib-compressed"),
        "name": tfds.features.Text(doc="the example's file name in the source dataset"),
    })
  raise JaxsegError(f"--encoding: unknown encoding {encoding!r}; valid: {', '.join(ENCODINGS)}")


def _png(array: np.ndarray, level: int) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG", compress_level=level)
  return buffer.getvalue()


class Encoder:
  """Example -> serialized tf.Example bytes, with no TensorFlow (pickles as its arguments)."""

  def __init__(self, encoding: str, class_names: Sequence[str], in_channels: int = 3,
               image_dtype: str = "uint8"):
    self.encoding, self.class_names = encoding, tuple(class_names)
    self.in_channels, self.image_dtype = in_channels, image_dtype
    self.rgb8 = (in_channels, image_dtype) == (3, "uint8")
    from tensorflow_datasets.core import example_serializer  # pylint: disable=g-import-not-at-top
    self._features = tfds_features(encoding, self.class_names, in_channels, image_dtype)
    self._serializer = example_serializer.ExampleSerializer(
        self._features.get_serialized_info())

  def __reduce__(self):
    return (Encoder, (self.encoding, self.class_names, self.in_channels, self.image_dtype))

  def __call__(self, image: np.ndarray, label: np.ndarray, name: str,
               image_file: bytes | None = None) -> bytes:
    if self.encoding == "png":
      # Bytes go through tfds.features.Image untouched; only numpy arrays would need TF.
      if self.rgb8:
        image = image_file if image_file is not None else _png(image, _IMAGE_PNG_LEVEL)
      label = _png(label, _LABEL_PNG_LEVEL)
    example = self._features.encode_example({"image": image, "label": label, "name": name})
    # Deterministic: map entries in key order, not in this process's string-hash order, so the
    # same data gives the same bytes in every run (a resumed run equals an uninterrupted one).
    return self._serializer.get_tf_example(example).SerializeToString(deterministic=True)


def _describe(value) -> str:
  if isinstance(value, np.ndarray):
    return f"{value.dtype} {value.shape}"
  return type(value).__name__


def _source_jpeg(source, index: int, image: np.ndarray) -> bytes | None:
  """The source's JPEG file for this example if it decodes to exactly `image`, else None.

  Sources may offer `image_file(index) -> path`. Storing that file instead of a PNG keeps
  COCO-like datasets ~4x smaller and ~2x faster to decode, and loses nothing: it is kept only
  when PIL decodes it (as PreparedSource will) to the very pixels the source gave, and only
  for RGB JPEGs, which every decoder (TFDS's too) returns as (H, W, 3).
  """
  image_file = getattr(source, "image_file", None)
  if not callable(image_file):
    return None
  try:
    path = image_file(index)
    if not path:
      return None
    with open(path, "rb") as f:
      content = f.read()
    if not content.startswith(b"\xff\xd8"):
      return None
    with Image.open(io.BytesIO(content)) as decoded:
      if decoded.format != "JPEG" or decoded.mode != "RGB":
        return None
      pixels = np.asarray(decoded)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
    return None
  return content if pixels.shape == image.shape and np.array_equal(pixels, image) else None


def _encode(source, index: int, encoder: Encoder, check: dict) -> tuple[str, Any]:
  """("ok" or "jpeg", serialized) or ("bad", message) for example `index` of `source`;
  "jpeg" when the source's JPEG file is stored as it is."""
  try:
    example = source[index]
  except BadExample as e:
    return "bad", first_line(e)
  if BAD_KEY in example:
    return "bad", str(example[BAD_KEY])
  name = example.get("name") or f"{check['split']}_{index:06d}"
  where = f"{check['dataset']} {check['split']} example {index} ({name})"
  image, label = example.get("image"), example.get("label")
  if not (isinstance(image, np.ndarray) and image.dtype == np.dtype(encoder.image_dtype)
          and image.ndim == 3 and image.shape[-1] == encoder.in_channels):
    raise JaxsegError(f"{where}: image is {_describe(image)}; this source gives "
                      f"{encoder.image_dtype} (H, W, {encoder.in_channels})")
  if isinstance(label, np.ndarray) and label.ndim == 3 and label.shape[-1] == 1:
    label = label[..., 0]
  if not (isinstance(label, np.ndarray) and label.dtype == np.uint8
          and label.shape == image.shape[:2]):
    raise JaxsegError(f"{where}: label is {_describe(label)} for a {image.shape} image; sources "
                      "must give uint8 (H, W) class ids")
  try:
    check_label_range(label, check["num_classes"], check["ignore_index"], where)
  except BadExample as e:
    return "bad", first_line(e)
  jpeg = (_source_jpeg(source, index, image) if encoder.encoding == "png" and encoder.rgb8
          else None)
  return ("ok" if jpeg is None else "jpeg",
          encoder(np.ascontiguousarray(image), np.ascontiguousarray(label), str(name), jpeg))


_WORKER: dict[str, Any] = {}


def _worker_init(source, encoder, check):
  _WORKER.update(source=source, encoder=encoder, check=check)


def _worker_encode(index: int):
  return _encode(_WORKER["source"], index, _WORKER["encoder"], _WORKER["check"])


def encoded(source, indices: Sequence[int], encoder: Encoder, check: dict,
             num_workers: int) -> Iterator[tuple[str, Any]]:
  """The encoded examples in order; decoding and encoding spread over worker processes."""
  if num_workers <= 0 or len(indices) < 2:
    for index in indices:
      yield _encode(source, index, encoder, check)
    return
  # Spawned, not forked: the parent has imported JAX, whose threads do not survive a fork.
  context = multiprocessing.get_context("spawn")
  with context.Pool(num_workers, initializer=_worker_init,
                    initargs=(source, encoder, check)) as pool:
    yield from pool.imap(_worker_encode, indices, chunksize=4)


def fsync(path: str):
  """Flushes a file, or a directory's entries (a rename), to the disk."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def shard_path(version_dir: str, name: str, split: str, shard: int, num_shards: int) -> str:
  # TFDS's default template: {DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}
  return os.path.join(version_dir,
                      f"{name}-{split}.array_record-{shard:05d}-of-{num_shards:05d}")


def write_shard(path: str, records: Iterable[bytes]) -> tuple[int, int]:
  """Writes a shard under a temporary name and renames it when complete: (records, bytes)."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  tmp = f"{path}.tmp"
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")  # TFDS's option
  count = 0
  try:
    for record in records:
      writer.write(record)
      count += 1
  except BaseException:
    writer.close()
    os.remove(tmp)
    raise
  writer.close()
  fsync(tmp)
  os.replace(tmp, path)
  fsync(os.path.dirname(path))
  return count, os.path.getsize(path)
