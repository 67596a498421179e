"""COCO 2017 as semantic segmentation (Lin et al., 2014), from its instance, panoptic or
COCO-Stuff annotations.

    {data_dir}/{split}2017/*.jpg                                   images (split: train, val)
    {data_dir}/annotations/instances_{split}2017.json              labels="instances"
    {data_dir}/annotations/panoptic_{split}2017.json               labels="panoptic"
    {data_dir}/annotations/panoptic_{split}2017/*.png
    {data_dir}/stuffthingmaps_trainval2017/{split}2017/*.png       labels="stuff"

Instance annotations are painted into one class map per image with pycocotools (the dataset
authors' rasteriser, so masks match `COCO.annToMask` pixel for pixel); see `CocoSegmentation`
for the overlap and crowd rule. Every annotation is validated from the JSON alone before
pycocotools sees it (coco_masks.py says why and how).
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import numpy as np
from absl import logging

from jaxseg.data import files
from jaxseg.data.coco_masks import (describe, instance_mask, is_int, parse_segmentation,
                                    pycocotools_mask)
from jaxseg.data.files import BadExample, FileSource, list_pairs, read_image, read_pair
from jaxseg.errors import JaxsegError, first_line

SPLITS = ("train", "val")
LABELS = ("instances", "panoptic", "stuff")

# COCO 2017's 80 thing categories: (category id, name). Ids run 1..90 with 10 gaps (categories
# dropped before release); class ids are made contiguous in id order, 0 being background.
THING_CATEGORIES = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"),
    (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"),
    (24, "zebra"), (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"),
    (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"),
    (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"),
    (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"),
    (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"),
    (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"),
    (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"),
    (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"),
    (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)

# The Pascal VOC subset: CAT_LIST of torchvision's segmentation reference
# (pytorch/vision, references/segmentation/coco_utils.py, get_coco), the COCO category id of
# each VOC class in VOC's class order; 0 is background. Used to train the torchvision
# segmentation models published with "COCO_WITH_VOC_LABELS" weights.
VOC_CATEGORY_IDS = (0, 5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72)
VOC_CLASS_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
                   "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
                   "pottedplant", "sheep", "sofa", "train", "tvmonitor")

# COCO-Stuff's 91 stuff classes, ids 92..182 in order (nightrome/cocostuff, labels.md). Its
# stuffthingmaps PNGs hold id - 1 (0..181) and 255 for unlabelled; the 11 thing ids COCO never
# released (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91) do not occur, leaving 80 + 91 = 171.
STUFF_NAMES = (
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds",
    "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence",
    "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog",
    "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house",
    "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net",
    "paper", "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield",
    "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea",
    "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)
_FIRST_STUFF_ID = 92


def colormap(n: int) -> np.ndarray:
  """(n, 3) uint8 distinct colours, class 0 black: Pascal VOC's bit-interleaved palette."""
  colours = np.zeros((n, 3), np.uint8)
  for i in range(n):
    c, rgb = i, [0, 0, 0]
    for bit in range(7, -1, -1):
      for channel in range(3):
        rgb[channel] |= ((c >> channel) & 1) << bit
      c >>= 3
    colours[i] = rgb
  return colours


class _Annotation(NamedTuple):
  """One instance, validated. `data`: (offset into the image's coordinates, polygon lengths)
  for "polygons", uint32 run lengths for "rle", the compressed string for "rle_string"."""
  class_index: int
  iscrowd: bool
  ann_id: Any
  kind: str
  data: Any


class _Image(NamedTuple):
  """One image of labels="instances". All its polygon coordinates sit in one float64 array:
  one array per image instead of per polygon keeps the pickled source small."""
  file_name: str
  height: int
  width: int
  annotations: tuple[_Annotation, ...]
  coordinates: np.ndarray


class _PanopticImage(NamedTuple):
  file_name: str
  height: int
  width: int
  png_name: str
  segment_ids: np.ndarray  # sorted int64
  segment_classes: np.ndarray  # uint8, same order


def _read_json(path: str, what: str, keys: tuple[str, ...]) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise JaxsegError(f"{path}: no such file ({what})")
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise JaxsegError(f"{path}: not a readable JSON file ({first_line(e)})") from None
  if not isinstance(data, dict) or any(
      not isinstance(data.get(k), list) or not all(isinstance(x, dict) for x in data[k])
      for k in keys):
    raise JaxsegError(f"{path}: not a COCO {what} file (it needs the lists of objects "
                      f"{', '.join(keys)})")
  return data


def _key(value):
  """An id usable as a dict key: ints and strings as they are, anything else (a list, a bool)
  as a tuple that equals no valid id."""
  return value if is_int(value) or isinstance(value, str) else ("invalid", repr(value))


class CocoSegmentation(FileSource):
  """COCO 2017 semantic segmentation; a grain RandomAccessDataSource.

  labels="instances" (default) paints the instance annotations. classes="things": background
  and the 80 thing categories, 81 classes, contiguous in category-id order (person 1 ..
  toothbrush 80). classes="voc": torchvision's 20 Pascal VOC categories plus background, 21
  classes with VOC's names and order; annotations of the other 60 categories are dropped, so
  their pixels are background, as in torchvision's reference.

  Overlaps: non-crowd instances are painted largest first (by mask pixel count, ties in
  annotation-id order), so a smaller object on or in front of a larger one stays visible.
  Crowd annotations (iscrowd=1) are `ignore_index`, except on pixels of a non-crowd instance:
  a crowd region never hides an object someone outlined. (torchvision instead makes every
  pixel covered by two or more masks 255 and paints crowds as objects.)

  An image with no annotations, or none of the chosen classes, is a valid all-background
  example; COCO has ~1% such images and semantic segmentation trains on them.
  `min_labelled_area` drops train images whose annotations of the chosen classes (crowds
  included) have JSON `area` summing to at most this many pixels: torchvision's reference uses
  1000 on its train split (classes="voc", min_labelled_area=1000 reproduces that list). Other
  splits keep every image, so evaluation stays comparable.

  labels="panoptic": the panoptic PNGs (segment id = R + 256 G + 256^2 B), each segment's
  category from the JSON, its categories in id order as classes 0..132 for COCO's 133, id 0
  (unlabelled) `ignore_index`. Crowd segments keep their category: the panoptic maps do not
  overlap and this is how Mask2Former/detectron2 derive COCO semantic maps from them.
  labels="stuff": COCO-Stuff 164k maps, the 171 used ids as classes 0..170 (80 things, then 91
  stuff), 255 unlabelled -> `ignore_index`.

  Bad annotations of any category (empty or short polygons, odd or NaN/infinite coordinates,
  RLE counts that do not add up to the image or have the wrong size, unknown category or
  segmentation type, an annotation of an image that is not listed) are found in the JSON at
  construction; the error names the image file and annotation id. With `skip_bad_examples`
  the whole image is left out and the message kept in `skipped`. Image files that are missing,
  empty, corrupt or of another size than the JSON says fail when read, as `BadExample`.
  """

  ignore_index = 255

  def __init__(self, split: str = "train", *, data_dir: str, classes: str | None = None,
               labels: str = "instances", min_labelled_area: float | None = None,
               skip_bad_examples: bool = False):
    if split not in SPLITS:
      raise JaxsegError(f"unknown COCO split {split!r}; valid splits: {', '.join(SPLITS)}")
    if labels not in LABELS:
      raise JaxsegError(f"unknown COCO labels {labels!r}; valid choices: {', '.join(LABELS)}")
    if labels == "instances":
      classes = classes or "things"
      if classes not in ("things", "voc"):
        raise JaxsegError(f"unknown COCO classes {classes!r}; valid choices: things, voc")
      pycocotools_mask()  # fail now, not in a worker
    elif classes is not None:
      raise JaxsegError(f"COCO classes={classes!r} applies to labels='instances'; "
                        f"labels={labels!r} has its own fixed class list")
    elif min_labelled_area is not None:
      raise JaxsegError("min_labelled_area applies to labels='instances' only")
    if not data_dir:
      raise JaxsegError("COCO needs --data_dir (the folder holding train2017/, val2017/ and "
                        "annotations/)")
    self.split, self.data_dir = split, os.path.abspath(data_dir)
    self.classes, self.labels = classes, labels
    self._image_dir = os.path.join(self.data_dir, f"{split}2017")
    if not os.path.isdir(self._image_dir):
      raise JaxsegError(f"{self._image_dir}: no such directory (COCO {split} images)")
    if labels == "instances":
      records, skipped = self._list_instances(min_labelled_area, skip_bad_examples)
    elif labels == "panoptic":
      records, skipped = self._list_panoptic(skip_bad_examples)
    else:
      records, skipped = self._list_stuff(skip_bad_examples)
    if not records:
      raise JaxsegError(f"{self.data_dir}: no usable COCO {split} images")
    super().__init__(
        records, skip_bad_examples=skip_bad_examples, skipped=skipped,
        description=f"CocoSegmentation(split={split!r}, data_dir={self.data_dir!r}, "
                    f"classes={classes!r}, labels={labels!r}, "
                    f"min_labelled_area={min_labelled_area!r}, "
                    f"examples={len(records)})")

  # Listing --------------------------------------------------------------------------------

  def _report(self, problems: list[str], skip_bad_examples: bool) -> list[str]:
    """The skip messages, or BadExample naming the first problem."""
    if problems and not skip_bad_examples:
      more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
      raise BadExample(f"{problems[0]}{more}; pass skip_bad_examples to train without these "
                       "images")
    return problems

  def _list_instances(self, min_labelled_area, skip_bad_examples):
    json_path = os.path.join(self.data_dir, "annotations", f"instances_{self.split}2017.json")
    data = _read_json(json_path, "instances annotations", ("images", "annotations",
                                                            "categories"))
    json_name = os.path.basename(json_path)
    known = {cat_id for cat_id, _ in THING_CATEGORIES}
    for category in data["categories"]:
      if _key(category.get("id")) not in known:
        raise JaxsegError(f"{json_path}: category {describe(category.get('id'))} "
                          f"({category.get('name')}) is not one of COCO 2017's 80 thing "
                          "categories")
    listed = {category["id"] for category in data["categories"]}
    if self.classes == "voc":
      self.class_names = VOC_CLASS_NAMES
      class_of = {cat_id: i for i, cat_id in enumerate(VOC_CATEGORY_IDS) if i}
    else:
      self.class_names = ("background",) + tuple(name for _, name in THING_CATEGORIES)
      class_of = {cat_id: i + 1 for i, (cat_id, _) in enumerate(THING_CATEGORIES)}
    self.palette = colormap(len(self.class_names))

    problems: list[str] = []
    bad: set = set()
    images: dict[Any, dict[str, Any]] = {}
    for entry in data["images"]:
      image_id, file_name, height, width = (entry.get(k) for k in ("id", "file_name", "height",
                                                                    "width"))
      image_id = _key(image_id)
      where = f"{json_path}: image id {describe(image_id)}"
      if not _valid_image_entry(entry):
        problems.append(f"{where}: needs an integer or string id, a file_name and positive "
                        "integer height and width")
        bad.add(image_id)
      elif image_id in images:
        problems.append(f"{where}: listed twice")
        bad.add(image_id)
      else:
        images[image_id] = {"file_name": file_name, "height": height, "width": width,
                            "annotations": [], "polygons": [], "size": 0, "area": 0.0}

    for ann in data["annotations"]:
      image_id = _key(ann.get("image_id"))
      ann_id = ann.get("id")
      if image_id not in images:
        if image_id not in bad:
          problems.append(f"{json_path}: annotation {describe(ann_id)} is of image id "
                          f"{describe(image_id)}, which is not in its images list")
        continue
      if image_id in bad:
        continue  # one message per image
      image = images[image_id]
      try:
        category = _key(ann.get("category_id"))
        if category not in listed:
          raise ValueError(f"unknown category id {describe(category)}")
        iscrowd = ann.get("iscrowd", 0)
        if not (is_int(iscrowd) and iscrowd in (0, 1)):
          raise ValueError(f"iscrowd is {describe(iscrowd)}, not 0 or 1")
        kind, segment = parse_segmentation(ann.get("segmentation"), image["height"],
                                           image["width"])
      except ValueError as e:
        problems.append(f"{os.path.join(self._image_dir, image['file_name'])}: annotation "
                        f"{describe(ann_id)} ({json_name}): {e}")
        bad.add(image_id)
        continue
      if category not in class_of:
        continue  # not a class of this subset: background
      area = ann.get("area", 0)
      image["area"] += area if isinstance(area, (int, float)) else 0
      if kind == "polygons":
        lengths = tuple(len(p) for p in segment)
        image["polygons"].extend(segment)
        segment = (image["size"], lengths)
        image["size"] += sum(lengths)
      image["annotations"].append(
          _Annotation(class_of[category], bool(iscrowd), ann_id, kind, segment))

    records, dropped = [], 0
    for image_id in sorted(images, key=_sort_key):
      if image_id in bad:
        continue
      image = images[image_id]
      # Train only, as torchvision: evaluation keeps every val image.
      if min_labelled_area is not None and self.split == "train" and not (
          image["annotations"] and image["area"] > min_labelled_area):
        dropped += 1
        continue
      coordinates = (np.concatenate(image["polygons"]) if image["polygons"]
                     else np.zeros(0, np.float64))
      records.append(_Image(image["file_name"], image["height"], image["width"],
                            tuple(image["annotations"]), coordinates))
    if dropped:
      logging.info("COCO %s: left out %d images whose labelled area is %s pixels or less",
                   self.split, dropped, min_labelled_area)
    self._json_name = json_name
    return records, self._report(problems, skip_bad_examples)

  def _list_panoptic(self, skip_bad_examples):
    json_path = os.path.join(self.data_dir, "annotations", f"panoptic_{self.split}2017.json")
    self._png_dir = os.path.join(self.data_dir, "annotations", f"panoptic_{self.split}2017")
    data = _read_json(json_path, "panoptic annotations", ("images", "annotations",
                                                          "categories"))
    if not os.path.isdir(self._png_dir):
      raise JaxsegError(f"{self._png_dir}: no such directory (COCO panoptic PNGs)")
    ids = [c.get("id") for c in data["categories"]]
    if not all(map(is_int, ids)) or len(set(ids)) != len(ids) or not 0 < len(ids) < 256:
      raise JaxsegError(f"{json_path}: its categories need distinct integer ids (1 to 255 of "
                        "them)")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    class_of = {c["id"]: i for i, c in enumerate(categories)}
    self.class_names = tuple(str(c.get("name")) for c in categories)
    self.palette = colormap(len(categories) + 1)[1:]  # no background class, so no black

    problems: list[str] = []
    images, bad = {}, set()
    for entry in data["images"]:
      image_id = _key(entry.get("id"))
      if not _valid_image_entry(entry) or image_id in images:
        problems.append(f"{json_path}: image id {describe(image_id)}: needs an integer or "
                        "string id of its own, a file_name and positive integer height and "
                        "width")
        bad.add(image_id)
        continue
      images[image_id] = entry
    found = {}
    for ann in data["annotations"]:
      image_id = _key(ann.get("image_id"))
      png_name = ann.get("file_name")
      png_path = os.path.join(self._png_dir, str(png_name))
      if image_id not in images:
        if image_id not in bad:
          problems.append(f"{png_path}: panoptic annotation of image id {describe(image_id)}, "
                          "which is not in its images list")
        continue
      try:
        if not isinstance(png_name, str) or image_id in found:
          raise ValueError("needs one annotation per image, with a PNG file_name")
        segments = ann.get("segments_info")
        if not isinstance(segments, list) or not all(isinstance(x, dict) for x in segments):
          raise ValueError("segments_info is not a list of objects")
        ids, classes = [], []
        for segment in segments:
          segment_id, category = segment.get("id"), _key(segment.get("category_id"))
          if not is_int(segment_id) or not 0 < segment_id < 256**3:
            raise ValueError(f"segment id {describe(segment_id)} is not in 1..{256**3 - 1}")
          if segment_id in ids:
            raise ValueError(f"segment {segment_id} is listed twice")
          if category not in class_of:
            raise ValueError(f"segment {segment_id}: unknown category id {describe(category)}")
          ids.append(segment_id)
          classes.append(class_of[category])
      except ValueError as e:
        problems.append(f"{png_path}: {e}")
        bad.add(image_id)
        continue
      order = np.argsort(np.asarray(ids, np.int64), kind="stable")
      found[image_id] = (png_name, np.asarray(ids, np.int64)[order],
                         np.asarray(classes, np.uint8)[order])
    records = []
    for image_id in sorted(images, key=_sort_key):
      if image_id in bad:
        continue
      entry = images[image_id]
      if image_id not in found:
        problems.append(f"{os.path.join(self._image_dir, entry['file_name'])}: no panoptic "
                        f"annotation in {os.path.basename(json_path)}")
        continue
      records.append(_PanopticImage(entry["file_name"], entry["height"], entry["width"],
                                    *found[image_id]))
    return records, self._report(problems, skip_bad_examples)

  def _list_stuff(self, skip_bad_examples):
    label_dir = os.path.join(self.data_dir, "stuffthingmaps_trainval2017", f"{self.split}2017")
    if not os.path.isdir(label_dir):
      raise JaxsegError(f"{label_dir}: no such directory (COCO-Stuff label maps)")
    self.class_names = tuple(name for _, name in THING_CATEGORIES) + STUFF_NAMES
    self.palette = colormap(len(self.class_names) + 1)[1:]
    raw_ids = [cat_id - 1 for cat_id, _ in THING_CATEGORIES] + [
        _FIRST_STUFF_ID - 1 + i for i in range(len(STUFF_NAMES))]
    self._lut = np.full(256, self.ignore_index, np.uint8)
    self._lut[raw_ids] = np.arange(len(raw_ids))
    self._valid = np.zeros(256, bool)
    self._valid[raw_ids + [255]] = True
    return list_pairs(self._image_dir, label_dir, lambda rel: os.path.splitext(rel)[0] + ".png",
                      image_suffixes=(".jpg", ".jpeg", ".png"), what=f"COCO-Stuff {self.split}",
                      skip_bad_examples=skip_bad_examples)

  # Reading --------------------------------------------------------------------------------

  def image_file(self, index: int) -> str:
    record = self._records[index]
    if self.labels == "stuff":
      return record[0]
    return os.path.join(self._image_dir, record.file_name)

  def load(self, record):
    if self.labels == "stuff":
      return self._load_stuff(record)
    image_path = os.path.join(self._image_dir, record.file_name)
    image = read_image(image_path)
    if image.shape[:2] != (record.height, record.width):
      source = self._json_name if self.labels == "instances" else "the panoptic JSON"
      raise BadExample(f"{image_path}: image is {image.shape[1]}x{image.shape[0]} but "
                       f"{source} says {record.width}x{record.height} (WxH)")
    if self.labels == "instances":
      return {"image": image, "label": self._paint(record), "name": record.file_name}
    return self._load_panoptic(record, image, image_path)

  def _paint(self, record: _Image) -> np.ndarray:
    """The class map of one image by the rule in the class docstring."""
    height, width = record.height, record.width
    label = np.zeros((height, width), np.uint8)
    solid, crowds = [], []
    for ann in record.annotations:
      data = ann.data
      if ann.kind == "polygons":
        offset, lengths = data
        data = []
        for length in lengths:
          data.append(record.coordinates[offset:offset + length])
          offset += length
      mask = instance_mask(ann.kind, data, height, width)
      (crowds if ann.iscrowd else solid).append((mask, ann.class_index, ann.ann_id))
    # Equal areas in annotation-id order, so the higher id is on top whatever the file order.
    solid.sort(key=lambda item: (-int(item[0].sum()), _sort_key(item[2])))
    objects = np.zeros((height, width), bool)
    for mask, class_index, _ in solid:
      label[mask] = class_index
      objects |= mask
    for mask, _, _ in crowds:
      label[mask & ~objects] = self.ignore_index
    return label

  def _load_panoptic(self, record: _PanopticImage, image: np.ndarray, image_path: str):
    png_path = os.path.join(self._png_dir, record.png_name)
    with files._open(png_path, "panoptic label") as png:  # pylint: disable=protected-access
      png = files._load(png, png_path, "panoptic label")  # pylint: disable=protected-access
      if png.mode != "RGB":
        raise BadExample(f"{png_path}: panoptic label has mode {png.mode}; expected RGB "
                         "segment ids")
      rgb = np.asarray(png, np.uint32)
    if rgb.shape[:2] != image.shape[:2]:
      raise BadExample(f"{png_path}: label is {rgb.shape[1]}x{rgb.shape[0]} but its image "
                       f"{image_path} is {image.shape[1]}x{image.shape[0]} (WxH)")
    segment_ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
    present, inverse = np.unique(segment_ids, return_inverse=True)
    position = np.searchsorted(record.segment_ids, present)
    listed = position < len(record.segment_ids)
    listed[listed] = record.segment_ids[position[listed]] == present[listed]
    unknown = present[~listed & (present != 0)]
    if unknown.size:
      raise BadExample(f"{png_path}: segment ids {unknown[:8].tolist()} are in the PNG but not "
                       "in its segments_info")
    classes = np.full(len(present), self.ignore_index, np.uint8)  # id 0: unlabelled
    classes[listed] = record.segment_classes[position[listed]]
    return {"image": image, "label": classes[inverse.reshape(segment_ids.shape)],
            "name": record.file_name, "label_file": png_path}

  def _load_stuff(self, record):
    image_path, label_path = record
    example = read_pair(image_path, label_path)
    raw = example["label"]
    if not self._valid[raw].all():
      values = np.unique(raw[~self._valid[raw]]).tolist()
      raise BadExample(f"{label_path}: values {values[:8]} are not COCO-Stuff label ids "
                       "(0..181 less the 11 unused thing ids, 255 unlabelled)")
    example["label"] = self._lut[raw]
    return example


def _valid_image_entry(entry: dict[str, Any]) -> bool:
  return ((is_int(entry.get("id")) or isinstance(entry.get("id"), str))
          and isinstance(entry.get("file_name"), str) and bool(entry["file_name"])
          and all(is_int(entry.get(k)) and entry[k] > 0 for k in ("height", "width")))


def _sort_key(value):
  """Image or annotation ids in numeric order (COCO's are ints), any other after them as text."""
  return (0, value, "") if is_int(value) else (1, 0, str(value))
