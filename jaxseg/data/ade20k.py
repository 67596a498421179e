"""ADE20K SceneParsing (Zhou et al., 2017): 150 classes of indoor and outdoor scenes.

    {data_dir}/images/{training,validation}/ADE_*.jpg
    {data_dir}/annotations/{training,validation}/ADE_*.png

`data_dir` is ADEChallengeData2016 (the benchmark's archive) or the folder holding it.
Annotation PNGs hold 0 for "other" (pixels of none of the 150 classes) and 1..150 for the
classes. Like mmsegmentation (`LoadAnnotations(reduce_zero_label=True)`), 0 becomes the ignore
index and every other value drops by one, so class ids run 0..149 and results compare with
published ADE20K numbers.
"""

from __future__ import annotations

import os

import numpy as np

from jaxseg.data.files import FileSource, list_pairs, read_pair
from jaxseg.errors import JaxsegError

SPLITS = {"train": "training", "val": "validation"}
_ARCHIVE = "ADEChallengeData2016"

# mmsegmentation's ADE20KDataset.METAINFO (mmseg/datasets/ade.py) in class-id order, typed
# out as data so that names and colours match the tables and pictures of published results.
# mmseg spells class 7 "bed " with a trailing space; the space is dropped here.
CLASS_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
    "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
# Two classes share a colour in mmseg's table (road 6 and skyscraper 48: 140, 140, 140); it is
# kept so that pictures match theirs.
PALETTE = np.array([
    [120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50], [4, 200, 3],
    [120, 120, 80], [140, 140, 140], [204, 5, 255], [230, 230, 230], [4, 250, 7],
    [224, 5, 255], [235, 255, 7], [150, 5, 61], [120, 120, 70], [8, 255, 51],
    [255, 6, 82], [143, 255, 140], [204, 255, 4], [255, 51, 7], [204, 70, 3],
    [0, 102, 200], [61, 230, 250], [255, 6, 51], [11, 102, 255], [255, 7, 71],
    [255, 9, 224], [9, 7, 230], [220, 220, 220], [255, 9, 92], [112, 9, 255],
    [8, 255, 214], [7, 255, 224], [255, 184, 6], [10, 255, 71], [255, 41, 10],
    [7, 255, 255], [224, 255, 8], [102, 8, 255], [255, 61, 6], [255, 194, 7],
    [255, 122, 8], [0, 255, 20], [255, 8, 41], [255, 5, 153], [6, 51, 255],
    [235, 12, 255], [160, 150, 20], [0, 163, 255], [140, 140, 140], [250, 10, 15],
    [20, 255, 0], [31, 255, 0], [255, 31, 0], [255, 224, 0], [153, 255, 0],
    [0, 0, 255], [255, 71, 0], [0, 235, 255], [0, 173, 255], [31, 0, 255],
    [11, 200, 200], [255, 82, 0], [0, 255, 245], [0, 61, 255], [0, 255, 112],
    [0, 255, 133], [255, 0, 0], [255, 163, 0], [255, 102, 0], [194, 255, 0],
    [0, 143, 255], [51, 255, 0], [0, 82, 255], [0, 255, 41], [0, 255, 173],
    [10, 0, 255], [173, 255, 0], [0, 255, 153], [255, 92, 0], [255, 0, 255],
    [255, 0, 245], [255, 0, 102], [255, 173, 0], [255, 0, 20], [255, 184, 184],
    [0, 31, 255], [0, 255, 61], [0, 71, 255], [255, 0, 204], [0, 255, 194],
    [0, 255, 82], [0, 10, 255], [0, 112, 255], [51, 0, 255], [0, 194, 255],
    [0, 122, 255], [0, 255, 163], [255, 153, 0], [0, 255, 10], [255, 112, 0],
    [143, 255, 0], [82, 0, 255], [163, 255, 0], [255, 235, 0], [8, 184, 170],
    [133, 0, 255], [0, 255, 92], [184, 0, 255], [255, 0, 31], [0, 184, 255],
    [0, 214, 255], [255, 0, 112], [92, 255, 0], [0, 224, 255], [112, 224, 255],
    [70, 184, 160], [163, 0, 255], [153, 0, 255], [71, 255, 0], [255, 0, 163],
    [255, 204, 0], [255, 0, 143], [0, 255, 235], [133, 255, 0], [255, 0, 235],
    [245, 0, 255], [255, 0, 122], [255, 245, 0], [10, 190, 212], [214, 255, 0],
    [0, 204, 255], [20, 0, 255], [255, 255, 0], [0, 153, 255], [0, 41, 255],
    [0, 255, 204], [41, 0, 255], [41, 255, 0], [173, 0, 255], [0, 245, 255],
    [71, 0, 255], [122, 0, 255], [0, 255, 184], [0, 92, 255], [184, 255, 0],
    [0, 133, 255], [255, 214, 0], [25, 194, 194], [102, 255, 0], [92, 0, 255],
], np.uint8)


def reduce_zero_label_table(ignore_index: int = 255) -> np.ndarray:
  """(256,) uint8 raw value -> class id, mmseg's reduce_zero_label applied to every value.

  mmseg does `label[label == 0] = 255; label = label - 1; label[label == 254] = 255` on uint8
  maps. Done to the table here, so 0 -> 255, v -> v - 1 for 1..254, and a raw 255 (which
  would wrap to 254) stays 255: ignored, as in mmseg.
  """
  table = np.arange(256, dtype=np.uint8)
  table[table == 0] = 255
  table = table - np.uint8(1)
  table[table == 254] = 255
  if ignore_index != 255:
    table[table == 255] = ignore_index
  return table


def find_root(data_dir: str) -> str:
  """ADEChallengeData2016 itself, whether `data_dir` is that folder or its parent."""
  for root in (data_dir, os.path.join(data_dir, _ARCHIVE)):
    if os.path.isdir(os.path.join(root, "images")) and os.path.isdir(
        os.path.join(root, "annotations")):
      return root
  raise JaxsegError(f"{data_dir}: not an ADE20K folder (looked for images/ and annotations/ "
                    f"in it and in {os.path.join(data_dir, _ARCHIVE)})")


class ADE20K(FileSource):
  """ADE20K SceneParsing (150 classes, mmseg's reduce_zero_label); a grain
  RandomAccessDataSource.

  Raw values above 150 other than 255 are no class of the benchmark: after the reduction they
  are 150..253, and reading that example raises BadExample (mmseg would count them silently).
  """

  class_names = CLASS_NAMES
  palette = PALETTE
  ignore_index = 255

  def __init__(self, split: str = "train", *, data_dir: str, skip_bad_examples: bool = False):
    if split not in SPLITS:
      raise JaxsegError(f"unknown ADE20K split {split!r}; valid splits: {', '.join(SPLITS)}")
    if not data_dir:
      raise JaxsegError(f"ADE20K needs --data_dir (the {_ARCHIVE} folder holding images/ and "
                        "annotations/, or its parent)")
    self.split, self.data_dir = split, os.path.abspath(data_dir)
    root = find_root(self.data_dir)
    folder = SPLITS[split]
    pairs, skipped = list_pairs(
        os.path.join(root, "images", folder), os.path.join(root, "annotations", folder),
        lambda rel: os.path.splitext(rel)[0] + ".png", image_suffixes=(".jpg",),
        what=f"ADE20K {split}", skip_bad_examples=skip_bad_examples)
    self._lut = reduce_zero_label_table(self.ignore_index)
    super().__init__(pairs, skip_bad_examples=skip_bad_examples, skipped=skipped,
                     description=f"ADE20K(split={split!r}, data_dir={self.data_dir!r}, "
                                 f"examples={len(pairs)})")

  def load(self, record):
    image_path, label_path = record
    return read_pair(image_path, label_path, lut=self._lut,
                     name=os.path.splitext(os.path.basename(image_path))[0])
