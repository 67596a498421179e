"""COCO segmentations made safe for pycocotools, then rasterised by it.

pycocotools' C code trusts its input: a NaN polygon coordinate becomes a huge integer there and
the outline buffer it allocates runs to gigabytes; a 4-number "polygon" is read as a box; RLE
counts that do not add up to the image decode to garbage or past the end of the mask.
`parse_segmentation` checks a segmentation from the JSON alone (compressed RLE strings are
decoded here exactly as pycocotools' rleFrString would) and `instance_mask` rasterises only
what it accepted, exactly as `COCO.annToMask` does.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from jaxseg.errors import JaxsegError


def pycocotools_mask():
  try:
    from pycocotools import mask  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise JaxsegError("COCO instance labels need pycocotools: pip install pycocotools") from e
  return mask


def is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def describe(value) -> str:
  if isinstance(value, tuple) and value[:1] == ("invalid",):
    value = value[1]
  text = json.dumps(value) if isinstance(value, (dict, list)) else repr(value)
  return text if len(text) <= 40 else text[:37] + "..."


def rle_string_counts(text: str) -> list[int]:
  """Run lengths of a compressed COCO RLE string, exactly as pycocotools' rleFrString reads it.

  6 bits per character ('0'..'o'), 5 of payload and a continuation bit, the last character's
  bit 4 a sign; from the fourth run on a run is stored as the difference to the run two
  before. Raises ValueError where the C code would read past the string, overflow or wrap a
  negative run into a huge one, so that a string this accepts is safe to hand to pycocotools.
  """
  counts: list[int] = []
  value = shift = 0
  for char in text:
    c = ord(char) - 48
    if not 0 <= c < 64:
      raise ValueError(f"compressed RLE has the character {char!r} (outside '0'..'o')")
    value |= (c & 0x1F) << shift
    shift += 5
    if c & 0x20:
      if shift >= 30:  # a 7th character would overflow the C decoder's int shift
        raise ValueError("compressed RLE has a number longer than 6 characters")
      continue
    if c & 0x10:
      value |= -1 << shift
    if len(counts) > 2:
      value += counts[-2]
    if not 0 <= value < 2**32:
      raise ValueError(f"compressed RLE decodes to a run of {value} pixels")
    counts.append(value)
    value = shift = 0
  if shift:
    raise ValueError("compressed RLE ends in the middle of a number")
  return counts


def parse_segmentation(segmentation, height: int, width: int) -> tuple[str, Any]:
  """(kind, data) of a COCO segmentation that is safe to rasterise at height x width.

  kind "polygons": data is a list of float64 (2k,) arrays; "rle": uint32 run lengths;
  "rle_string": the compressed string as bytes. Raises ValueError saying what is wrong.
  """
  if isinstance(segmentation, list):
    if not segmentation:
      raise ValueError("empty polygon list")
    polygons = []
    for i, polygon in enumerate(segmentation):
      try:  # numpy's type inference checks the elements faster than a Python loop
        xy = np.array(polygon) if isinstance(polygon, list) else None
      except (ValueError, TypeError):
        xy = None  # ragged nesting
      # Strings, None, nested lists and ints too big for int64 give another dtype or shape.
      if xy is None or xy.ndim != 1 or xy.dtype.kind not in "iuf":
        raise ValueError(f"polygon {i} is not a list of numbers ({describe(polygon)})")
      if len(polygon) < 6:
        # pycocotools reads a 4-number "polygon" as a box and fewer as garbage.
        raise ValueError(f"polygon {i} has {len(polygon)} numbers; a polygon needs at least "
                         "3 points (6 numbers)")
      if len(polygon) % 2:
        raise ValueError(f"polygon {i} has an odd number of coordinates ({len(polygon)})")
      xy = xy.astype(np.float64).reshape(-1, 2)  # the doubles pycocotools would make
      if not np.isfinite(xy).all():
        raise ValueError(f"polygon {i} has a NaN or infinite coordinate")
      # pycocotools draws the outline at 5x scale and allocates for its full length: points
      # far off the image cost memory for nothing, and no real annotation has them.
      if ((xy < -np.array([width, height])) | (xy > 2 * np.array([width, height]))).any():
        raise ValueError(f"polygon {i} has a point far outside the {width}x{height} image")
      polygons.append(xy.reshape(-1))
    return "polygons", polygons
  if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
    size, counts = segmentation["size"], segmentation["counts"]
    if not (isinstance(size, list) and len(size) == 2 and all(map(is_int, size))):
      raise ValueError(f"RLE size {describe(size)} is not [height, width]")
    if size != [height, width]:
      raise ValueError(f"RLE size {size} (h, w) differs from the image's [{height}, {width}]")
    if isinstance(counts, list):
      if not all(map(is_int, counts)) or (counts and not 0 <= min(counts) <= max(counts)
                                           < 2**32):
        raise ValueError("uncompressed RLE counts are not all non-negative integers")
      kind, data, total = "rle", np.asarray(counts, np.uint32), sum(counts)
    elif isinstance(counts, str):
      runs = rle_string_counts(counts)
      kind, data, total = "rle_string", counts.encode("ascii"), sum(runs)
    else:
      raise ValueError(f"RLE counts of type {type(counts).__name__}")
    if total != height * width:
      raise ValueError(f"RLE counts sum to {total} pixels, not {height}x{width}="
                       f"{height * width}")
    return kind, data
  raise ValueError(f"segmentation of unknown type ({describe(segmentation)})")


def instance_mask(kind: str, data, height: int, width: int) -> np.ndarray:
  """bool (H, W) mask of a parsed segmentation, rasterised as `COCO.annToMask` does."""
  mask_api = pycocotools_mask()
  if kind == "polygons":
    rle = mask_api.merge(mask_api.frPyObjects(list(data), height, width))
  elif kind == "rle":
    rle = mask_api.frPyObjects({"size": [height, width], "counts": data}, height, width)
  else:
    rle = {"size": [height, width], "counts": data}
  return mask_api.decode(rle).astype(bool)
