"""Cityscapes fine annotations (Cordts et al., 2016): 19 train classes, 1024x2048 images.

    {data_dir}/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
    {data_dir}/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png

Label ids map to train ids through the official table in `cityscapesscripts.helpers.labels`
(the dataset authors' package), so ids, names and colours cannot drift from the benchmark's;
every id without a train id (255 or -1 there) becomes `ignore_index`.
"""

from __future__ import annotations

import os

import numpy as np

from jaxseg.data.files import FileSource, list_pairs, read_pair
from jaxseg.errors import JaxsegError

SPLITS = ("train", "val", "test", "train_extra")
_IMAGE_SUFFIX = "_leftImg8bit.png"


def label_table(ignore_index: int = 255):
  """(lut id -> train id (256,), class names by train id, palette (19, 3)) from the official
  table."""
  try:
    from cityscapesscripts.helpers import labels  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise JaxsegError("Cityscapes needs the official label table: pip install "
                      "'jaxseg[cityscapes]' (cityscapesscripts)") from e
  lut = np.full(256, ignore_index, np.uint8)
  trained = sorted((l for l in labels.labels if 0 <= l.trainId < 255), key=lambda l: l.trainId)
  for label in labels.labels:
    if 0 <= label.id < 256 and 0 <= label.trainId < 255:
      lut[label.id] = label.trainId
  names = tuple(l.name for l in trained)
  palette = np.array([l.color for l in trained], np.uint8)
  if [l.trainId for l in trained] != list(range(len(trained))):
    raise JaxsegError("cityscapesscripts' train ids are not 0..N-1; unsupported version")
  return lut, names, palette


class Cityscapes(FileSource):
  """Cityscapes (gtFine, 19 classes); a grain RandomAccessDataSource."""

  ignore_index = 255

  def __init__(self, split: str = "train", *, data_dir: str, skip_bad_examples: bool = False):
    if split not in SPLITS:
      raise JaxsegError(f"unknown Cityscapes split {split!r}; valid splits: {', '.join(SPLITS)}")
    if not data_dir:
      raise JaxsegError("Cityscapes needs --data_dir (the folder holding leftImg8bit/ and "
                        "gtFine/)")
    self.split, self.data_dir = split, os.path.abspath(data_dir)
    self._lut, self.class_names, self.palette = label_table(self.ignore_index)
    annotations = "gtCoarse" if split == "train_extra" else "gtFine"

    def label_name(relative):
      if not relative.endswith(_IMAGE_SUFFIX):
        return None
      return relative[:-len(_IMAGE_SUFFIX)] + f"_{annotations}_labelIds.png"

    pairs, skipped = list_pairs(
        os.path.join(self.data_dir, "leftImg8bit", split),
        os.path.join(self.data_dir, annotations, split), label_name,
        image_suffixes=(_IMAGE_SUFFIX,), what=f"Cityscapes {split}",
        skip_bad_examples=skip_bad_examples)
    super().__init__(pairs, skip_bad_examples=skip_bad_examples, skipped=skipped,
                     description=f"Cityscapes(split={split!r}, data_dir={self.data_dir!r}, "
                                 f"examples={len(pairs)})")

  def load(self, record):
    image_path, label_path = record
    return read_pair(image_path, label_path, lut=self._lut,
                     name=os.path.basename(image_path)[:-len(_IMAGE_SUFFIX)])
