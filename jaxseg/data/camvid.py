"""CamVid in the SegNet layout: 11 classes, 360x480 street scenes (Brostow et al., 2008).

    {data_dir}/train/NAME.png|jpg   {data_dir}/trainannot/NAME.png   (and val, test)

Annotation PNGs hold class ids 0..10 and 11 for void, which becomes `ignore_index`.
"""

from __future__ import annotations

import os

import numpy as np

from jaxseg.data.files import FileSource, list_pairs, read_pair
from jaxseg.errors import JaxsegError

SPLITS = ("train", "val", "test")


class CamVid(FileSource):
  """CamVid (SegNet's 11-class version); a grain RandomAccessDataSource."""

  class_names = ("sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence",
                 "car", "pedestrian", "bicyclist")
  # The colours of SegNet-Tutorial's CamVid visualisation, so pictures look familiar.
  palette = np.array([[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128],
                      [60, 40, 222], [128, 128, 0], [192, 128, 128], [64, 64, 128],
                      [64, 0, 128], [64, 64, 0], [0, 128, 192]], np.uint8)
  ignore_index = 255
  void = 11

  def __init__(self, split: str = "train", *, data_dir: str, skip_bad_examples: bool = False):
    if split not in SPLITS:
      raise JaxsegError(f"unknown CamVid split {split!r}; valid splits: {', '.join(SPLITS)}")
    if not data_dir:
      raise JaxsegError("CamVid needs --data_dir (the folder holding train/ and trainannot/)")
    self.split, self.data_dir = split, os.path.abspath(data_dir)
    pairs, skipped = list_pairs(
        os.path.join(self.data_dir, split), os.path.join(self.data_dir, split + "annot"),
        lambda rel: os.path.splitext(rel)[0] + ".png", image_suffixes=(".png", ".jpg", ".jpeg"),
        what=f"CamVid {split}", skip_bad_examples=skip_bad_examples)
    self._lut = np.arange(256, dtype=np.uint8)
    self._lut[self.void] = self.ignore_index
    super().__init__(pairs, skip_bad_examples=skip_bad_examples, skipped=skipped,
                     description=f"CamVid(split={split!r}, data_dir={self.data_dir!r}, "
                                 f"examples={len(pairs)})")

  def load(self, record):
    image_path, label_path = record
    return read_pair(image_path, label_path, lut=self._lut)
