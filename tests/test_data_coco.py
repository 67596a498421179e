"""CocoSegmentation on tiny COCO trees written to tmp_path: masks against pycocotools'
`COCO.annToMask`, class mappings, every bad-annotation case, panoptic and stuff maps, pickling."""

from __future__ import annotations

import contextlib
import io
import json
import math
import pickle
import time

import numpy as np
import pytest
from PIL import Image

from pycocotools import coco as coco_api, mask as mask_api

from jaxseg.data import coco as coco_data, coco_masks
from jaxseg.data.coco import CocoSegmentation
from jaxseg.data.files import BAD_KEY, BadExample
from jaxseg.errors import JaxsegError

# pycocotools' decode under numpy 2 (its own code, harmless).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# Real COCO ids with gaps before them (12 is unused, so stop sign 13 is class 12).
CATEGORIES = {1: "person", 3: "car", 13: "stop sign", 18: "dog", 62: "chair", 90: "toothbrush"}
THINGS_CLASS = {1: 1, 3: 3, 13: 12, 18: 17, 62: 57, 90: 80}
VOC_CLASS = {1: 15, 3: 7, 18: 12, 62: 9}  # stop sign and toothbrush are not VOC classes


def _name(image_id):
  return f"{image_id:012d}.jpg"


def write_coco(root, images, annotations, *, split="val", categories=None):
  """Writes {split}2017/*.jpg for (id, width, height) and annotations/instances_*.json."""
  (root / "annotations").mkdir(parents=True, exist_ok=True)
  (root / f"{split}2017").mkdir(exist_ok=True)
  rng = np.random.default_rng(0)
  entries = []
  for image_id, width, height in images:
    pixels = rng.integers(0, 256, (height, width, 3), np.uint8)
    Image.fromarray(pixels).save(root / f"{split}2017" / _name(image_id), quality=95)
    entries.append({"id": image_id, "file_name": _name(image_id), "height": height,
                    "width": width})
  categories = categories or [{"id": i, "name": n, "supercategory": "x"}
                              for i, n in CATEGORIES.items()]
  path = root / "annotations" / f"instances_{split}2017.json"
  path.write_text(json.dumps({"images": entries, "annotations": annotations,
                              "categories": categories}))  # NaN/Infinity written as such
  return path


def _box_mask(height, width, top, left, bottom, right):
  mask = np.zeros((height, width), np.uint8)
  mask[top:bottom, left:right] = 1
  return mask


def _uncompressed(mask):
  """COCO's uncompressed RLE (column-major runs starting with zeros), as crowds are stored."""
  flat = np.asarray(mask, np.uint8).flatten(order="F")
  change = np.flatnonzero(np.diff(flat)) + 1
  bounds = np.concatenate([[0], change, [flat.size]])
  runs = np.diff(bounds).tolist()
  if flat[0]:
    runs = [0] + runs
  return {"size": list(mask.shape), "counts": runs}


def _compressed(mask):
  rle = mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _ann(ann_id, image_id, category, segmentation, iscrowd=0, area=100.0):
  return {"id": ann_id, "image_id": image_id, "category_id": category,
          "segmentation": segmentation, "iscrowd": iscrowd, "area": area, "bbox": [0, 0, 1, 1]}


def main_dataset(root):
  """Polygons (one and two parts), both RLE forms, crowds, overlaps, an equal-area tie, an image
  without annotations and one with only non-VOC categories."""
  h1, w1 = 48, 64
  crowd = _box_mask(h1, w1, 20, 0, 48, 20)  # over the person, the car and background
  annotations = [
      _ann(10, 1, 1, [[2, 2, 60, 2, 60, 44, 2, 44]], area=2400),
      _ann(11, 1, 3, [[10, 8, 30, 6, 34, 24, 12, 28]]),
      _ann(12, 1, 18, [[40, 30, 55, 30, 50, 42], [36, 4, 44, 4, 44, 12, 36, 12]]),
      _ann(13, 1, 1, _uncompressed(crowd), iscrowd=1),
      _ann(14, 1, 90, _compressed(_box_mask(h1, w1, 30, 20, 36, 30))),
      _ann(15, 1, 62, _uncompressed(_box_mask(h1, w1, 14, 20, 36, 42))),  # larger than the car
      # Image 7: only a toothbrush, a stop-sign crowd and two equal squares listed in reverse
      # id order (stop sign 23 overlapping dog 22).
      _ann(20, 7, 90, [[30, 2, 38, 2, 38, 10, 30, 10]]),
      _ann(21, 7, 13, _uncompressed(_box_mask(32, 40, 20, 0, 32, 40)), iscrowd=1),
      _ann(23, 7, 13, [[10, 10, 20, 10, 20, 20, 10, 20]]),
      _ann(22, 7, 18, [[4, 4, 14, 4, 14, 14, 4, 14]]),
  ]
  return write_coco(root, [(1, w1, h1), (2, 32, 24), (7, 40, 32)], annotations)


def reference_label(coco, image_id, class_of):
  """The documented rule applied to pycocotools' own masks: non-crowd largest first (ties by
  id), then crowds -> 255 where no non-crowd instance is."""
  info = coco.imgs[image_id]
  label = np.zeros((info["height"], info["width"]), np.uint8)
  anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None))
          if a["category_id"] in class_of]
  masks = {a["id"]: coco.annToMask(a).astype(bool) for a in anns}
  solid = sorted((a for a in anns if not a["iscrowd"]),
                 key=lambda a: (-masks[a["id"]].sum(), a["id"]))
  covered = np.zeros_like(label, bool)
  for a in solid:
    label[masks[a["id"]]] = class_of[a["category_id"]]
    covered |= masks[a["id"]]
  for a in anns:
    if a["iscrowd"]:
      label[masks[a["id"]] & ~covered] = 255
  return label


@pytest.fixture(scope="module")
def main_tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("coco")
  path = main_dataset(root)
  with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its timings
    coco = coco_api.COCO(str(path))
  return root, coco


@pytest.mark.parametrize("classes", ["things", "voc"])
def test_masks_match_pycocotools_pixel_for_pixel(main_tree, classes):
  root, coco = main_tree
  source = CocoSegmentation("val", data_dir=str(root), classes=classes)
  class_of = THINGS_CLASS if classes == "things" else VOC_CLASS
  assert len(source) == 3 and not source.skipped
  for index, image_id in enumerate([1, 2, 7]):
    example = source[index]
    expected = reference_label(coco, image_id, class_of)
    assert example["name"] == _name(image_id)
    assert example["image"].dtype == np.uint8 and example["image"].shape == expected.shape + (3,)
    assert example["label"].dtype == np.uint8
    np.testing.assert_array_equal(example["label"], expected)
  label1, label2, label7 = (source[i]["label"] for i in range(3))
  # The cases the rule is about actually occur in these images.
  assert label1[16, 20] == class_of[3]  # the car on top of the larger chair and person
  assert label1[33, 25] == (THINGS_CLASS[90] if classes == "things" else class_of[62])
  assert label1[46, 1] == 255 and label1[40, 5] == class_of[1]  # crowd only off the person
  assert not label2.any()  # no annotations: all background
  if classes == "things":
    assert label7[15, 12] == THINGS_CLASS[13]  # equal areas: the higher id (23) on top
    assert (label7 == 255).any()
  else:  # only the dog is a VOC class; the stop-sign crowd and the toothbrush are background
    assert set(np.unique(label7).tolist()) == {0, VOC_CLASS[18]}


def test_class_mapping_things(main_tree):
  root, _ = main_tree
  source = CocoSegmentation("val", data_dir=str(root))
  assert source.num_classes == 81 and source.class_names[0] == "background"
  for cat_id, class_index in THINGS_CLASS.items():
    assert source.class_names[class_index] == CATEGORIES[cat_id]
  assert source.palette.shape == (81, 3) and source.palette.dtype == np.uint8
  assert (source.palette[0] == 0).all()
  assert len({tuple(c) for c in source.palette}) == 81
  assert source.ignore_index == 255


def test_voc_subset_is_torchvisions_cat_list():
  # torchvision references/segmentation/coco_utils.py: CAT_LIST in VOC class order.
  assert coco_data.VOC_CATEGORY_IDS == (0, 5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1,
                                        64, 20, 63, 7, 72)
  names = dict(coco_data.THING_CATEGORIES)
  voc = dict(zip(coco_data.VOC_CATEGORY_IDS[1:], coco_data.VOC_CLASS_NAMES[1:]))
  assert voc[5] == "aeroplane" and names[5] == "airplane"
  assert voc[4] == "motorbike" and names[4] == "motorcycle"
  assert voc[63] == "sofa" and names[63] == "couch"
  assert voc[72] == "tvmonitor" and names[72] == "tv"
  assert voc[67] == "diningtable" and names[67] == "dining table"
  assert voc[64] == "pottedplant" and names[64] == "potted plant"
  for cat_id, voc_name in voc.items():  # the rest are the same word
    if cat_id not in (5, 4, 63, 72, 67, 64):
      assert names[cat_id] == voc_name


def test_voc_classes(main_tree):
  root, _ = main_tree
  source = CocoSegmentation("val", data_dir=str(root), classes="voc")
  assert source.num_classes == 21
  assert source.class_names[15] == "person" and source.class_names[7] == "car"
  assert source.class_names[12] == "dog" and source.class_names[9] == "chair"
  np.testing.assert_array_equal(source.palette[:3], [[0, 0, 0], [128, 0, 0], [0, 128, 0]])


def test_thing_table_is_cocos():
  ids = [cat_id for cat_id, _ in coco_data.THING_CATEGORIES]
  assert len(ids) == 80 and ids == sorted(ids) and ids[-1] == 90
  assert set(range(1, 91)) - set(ids) == {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}


def test_min_labelled_area_drops_like_torchvision(tmp_path):
  annotations = [_ann(1, 1, 1, [[0, 0, 30, 0, 30, 30]], area=1001.0),
                 _ann(2, 2, 1, [[0, 0, 10, 0, 10, 10]], area=600.0),
                 _ann(3, 2, 90, [[0, 0, 20, 0, 20, 20]], area=600.0),  # not VOC: not counted
                 _ann(4, 3, 3, [[0, 0, 20, 0, 20, 20]], area=500.0),
                 _ann(5, 3, 3, [[0, 0, 20, 0, 20, 20]], area=501.0, iscrowd=1)]
  images = [(1, 32, 32), (2, 32, 32), (3, 32, 32), (4, 32, 32)]
  for split in ("train", "val"):
    write_coco(tmp_path, images, annotations, split=split)
  names = lambda s: [s[i]["name"] for i in range(len(s))]
  assert len(CocoSegmentation("train", data_dir=str(tmp_path), classes="voc")) == 4
  voc = CocoSegmentation("train", data_dir=str(tmp_path), classes="voc", min_labelled_area=1000)
  assert names(voc) == [_name(1), _name(3)]  # crowds count, as in torchvision
  things = CocoSegmentation("train", data_dir=str(tmp_path), min_labelled_area=1000)
  assert names(things) == [_name(1), _name(2), _name(3)]
  # Train only: evaluation keeps every val image, as torchvision's reference does.
  assert len(CocoSegmentation("val", data_dir=str(tmp_path), classes="voc",
                              min_labelled_area=1000)) == 4


def _good(image_id):
  return _ann(1000 + image_id, image_id, 1, [[1, 1, 20, 1, 20, 20, 1, 20]])


# Each bad segmentation/annotation of annotation 777 on image 2 (64x48).
BAD_ANNOTATIONS = {
    "empty polygon list": dict(segmentation=[]),
    "empty polygon": dict(segmentation=[[]]),
    "4-number polygon": dict(segmentation=[[1, 1, 10, 10]]),
    "2-number polygon": dict(segmentation=[[1, 2, 3, 4, 5, 6], [1, 1]]),
    "odd coordinates": dict(segmentation=[[1, 1, 10, 1, 10, 10, 5]]),
    "NaN coordinate": dict(segmentation=[[1, 1, math.nan, 1, 10, 10]]),
    "infinite coordinate": dict(segmentation=[[1, 1, math.inf, 1, 10, 10]]),
    "huge coordinate": dict(segmentation=[[1, 1, 1e12, 1, 10, 10]]),
    "string coordinate": dict(segmentation=[[1, 1, "5", 1, 10, 10]]),
    "RLE counts short": dict(segmentation={"size": [48, 64], "counts": [100, 50, 10]}),
    "RLE counts long": dict(segmentation={"size": [48, 64], "counts": [3000, 100, 100]}),
    "RLE negative count": dict(segmentation={"size": [48, 64], "counts": [3100, -10, 2]}),
    "RLE size differs": dict(segmentation={"size": [64, 48], "counts": [3072]}),
    "compressed RLE sum": dict(segmentation=_compressed(_box_mask(48, 65, 2, 2, 9, 9)) | {
        "size": [48, 64]}),
    "compressed RLE bad char": dict(segmentation={"size": [48, 64], "counts": "a1~"}),
    "compressed RLE cut": dict(segmentation={"size": [48, 64], "counts": "d1W"}),
    "unknown category": dict(category_id=999),
    "unreleased category 12": dict(category_id=12),
    "segmentation None": dict(segmentation=None),
    "segmentation dict": dict(segmentation={"polygons": [[1, 2, 3, 4, 5, 6]]}),
    "segmentation number": dict(segmentation=5),
    "iscrowd 2": dict(iscrowd=2),
}


def _bad_tree(root, case):
  annotation = _ann(777, 2, 3, [[1, 1, 20, 1, 20, 20]])
  annotation.update(BAD_ANNOTATIONS[case])
  write_coco(root, [(1, 64, 48), (2, 64, 48), (3, 32, 32)],
             [_good(1), _good(2), annotation, _good(3)])


@pytest.mark.parametrize("case", list(BAD_ANNOTATIONS))
def test_bad_annotation_names_file_and_id_or_is_skipped(tmp_path, case):
  _bad_tree(tmp_path, case)
  start = time.monotonic()
  with pytest.raises(BadExample) as error:
    CocoSegmentation("val", data_dir=str(tmp_path))
  message = str(error.value)
  assert "\n" not in message
  assert _name(2) in message and "annotation 777" in message
  source = CocoSegmentation("val", data_dir=str(tmp_path), skip_bad_examples=True)
  assert [source[i]["name"] for i in range(len(source))] == [_name(1), _name(3)]
  assert len(source.skipped) == 1
  assert _name(2) in source.skipped[0] and "annotation 777" in source.skipped[0]
  assert time.monotonic() - start < 5  # the NaN polygon never reaches pycocotools


def test_annotation_of_an_unlisted_image(tmp_path):
  write_coco(tmp_path, [(1, 32, 32), (2, 32, 32)],
             [_good(1), _ann(777, 5, 1, [[1, 1, 9, 1, 9, 9]]), _good(2)])
  with pytest.raises(BadExample, match=r"annotation 777 is of image id 5, which is not"):
    CocoSegmentation("val", data_dir=str(tmp_path))
  source = CocoSegmentation("val", data_dir=str(tmp_path), skip_bad_examples=True)
  assert len(source) == 2 and "777" in source.skipped[0]


def test_nan_polygon_would_hurt_pycocotools_directly():
  # Why the check exists: the polygon is refused before any C code sees it.
  with pytest.raises(ValueError, match="NaN"):
    coco_masks.parse_segmentation([[1.0, 1.0, math.nan, 2.0, 3.0, 3.0]], 10, 10)


@pytest.mark.parametrize("seed", range(3))
def test_compressed_rle_decoder_matches_pycocotools(seed):
  rng = np.random.default_rng(seed)
  height, width = 37, 53
  mask = (rng.random((height, width)) < 0.3) | _box_mask(height, width, 5, 5, 30, 40).astype(bool)
  counts = mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
  runs = coco_masks.rle_string_counts(counts)
  assert runs == _uncompressed(mask)["counts"]  # deltas and negative numbers included
  kind, data = coco_masks.parse_segmentation({"size": [height, width], "counts": counts},
                                            height, width)
  np.testing.assert_array_equal(coco_masks.instance_mask(kind, data, height, width), mask)


def _decode_case(path, case):
  if case == "missing":
    path.unlink()
  elif case == "empty":
    path.write_bytes(b"")
  elif case == "truncated":
    path.write_bytes(path.read_bytes()[:200])
  elif case == "corrupt":
    path.write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 4)
  elif case == "size":
    Image.new("RGB", (32, 32)).save(path)


@pytest.mark.parametrize("case", ["missing", "empty", "truncated", "corrupt", "size"])
def test_unreadable_image_is_bad_example(tmp_path, case):
  write_coco(tmp_path, [(1, 64, 48), (2, 64, 48)], [_good(1), _good(2)])
  _decode_case(tmp_path / "val2017" / _name(2), case)
  source = CocoSegmentation("val", data_dir=str(tmp_path))
  assert source[0]["label"].shape == (48, 64)
  with pytest.raises(BadExample) as error:
    source[1]  # pylint: disable=pointless-statement
  assert _name(2) in str(error.value) and "\n" not in str(error.value)
  if case == "size":
    assert "32x32" in str(error.value) and "64x48" in str(error.value)
  skipping = CocoSegmentation("val", data_dir=str(tmp_path), skip_bad_examples=True)
  assert _name(2) in skipping[1][BAD_KEY]


def test_missing_paths_are_one_line_errors(tmp_path):
  with pytest.raises(JaxsegError, match="val2017: no such directory"):
    CocoSegmentation("val", data_dir=str(tmp_path))
  (tmp_path / "val2017").mkdir()
  with pytest.raises(JaxsegError, match=r"instances_val2017\.json: no such file"):
    CocoSegmentation("val", data_dir=str(tmp_path))
  (tmp_path / "annotations").mkdir()
  (tmp_path / "annotations" / "instances_val2017.json").write_text("{not json")
  with pytest.raises(JaxsegError, match="not a readable JSON file"):
    CocoSegmentation("val", data_dir=str(tmp_path))
  with pytest.raises(JaxsegError, match="unknown COCO split"):
    CocoSegmentation("test", data_dir=str(tmp_path))
  with pytest.raises(JaxsegError, match="classes='voc' applies to labels='instances'"):
    CocoSegmentation("val", data_dir=str(tmp_path), labels="stuff", classes="voc")


def test_repr_is_stable_and_source_pickles(main_tree):
  root, _ = main_tree
  source = CocoSegmentation("val", data_dir=str(root), classes="voc")
  again = CocoSegmentation("val", data_dir=str(root), classes="voc")
  assert repr(source) == repr(again)
  assert "0x" not in repr(source) and "classes='voc'" in repr(source)
  assert "labels='instances'" in repr(source)
  copy = pickle.loads(pickle.dumps(source))
  assert repr(copy) == repr(source) and len(copy) == len(source)
  for i in range(len(source)):
    a, b = source[i], copy[i]
    assert a["name"] == b["name"]
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


# Panoptic ------------------------------------------------------------------------------------

PANOPTIC_CATEGORIES = [{"id": 1, "name": "person", "isthing": 1},
                       {"id": 3, "name": "car", "isthing": 1},
                       {"id": 184, "name": "tree-merged", "isthing": 0},
                       {"id": 200, "name": "rug-merged", "isthing": 0},
                       {"id": 125, "name": "playingfield", "isthing": 0}]


def write_panoptic(root, segments_by_image, *, split="val"):
  """segments_by_image: image id -> (id map (H, W) ints, [(segment id, category, iscrowd)])."""
  (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
  png_dir = root / "annotations" / f"panoptic_{split}2017"
  png_dir.mkdir(parents=True, exist_ok=True)
  images, annotations = [], []
  for image_id, (ids, segments) in segments_by_image.items():
    height, width = ids.shape
    Image.new("RGB", (width, height), (90, 120, 30)).save(root / f"{split}2017" /
                                                          _name(image_id))
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    png_name = _name(image_id).replace(".jpg", ".png")
    Image.fromarray(rgb).save(png_dir / png_name)
    images.append({"id": image_id, "file_name": _name(image_id), "height": height,
                   "width": width})
    annotations.append({"image_id": image_id, "file_name": png_name, "segments_info": [
        {"id": s, "category_id": c, "iscrowd": crowd, "area": 1, "bbox": [0, 0, 1, 1]}
        for s, c, crowd in segments]})
  (root / "annotations" / f"panoptic_{split}2017.json").write_text(json.dumps(
      {"images": images, "annotations": annotations, "categories": PANOPTIC_CATEGORIES}))


def _panoptic_ids():
  ids = np.zeros((24, 32), np.int64)  # 0: unlabelled
  ids[:12, :16] = 5 + 256 * 7 + 65536 * 2  # uses all three channels
  ids[12:, :] = 26  # crowd of people
  ids[:12, 16:] = 300
  ids[2:6, 20:26] = 70000
  ids[20:, 28:] = 0
  return ids


def test_panoptic_labels(tmp_path):
  ids = _panoptic_ids()
  big = 5 + 256 * 7 + 65536 * 2
  write_panoptic(tmp_path, {3: (ids, [(big, 184, 0), (26, 1, 1), (300, 125, 0),
                                      (70000, 3, 0), (12345, 200, 0)])})
  source = CocoSegmentation("val", data_dir=str(tmp_path), labels="panoptic")
  # Categories in id order: person 1, car 3, playingfield 125, tree 184, rug 200.
  assert source.class_names == ("person", "car", "playingfield", "tree-merged", "rug-merged")
  assert source.palette.shape == (5, 3)
  example = source[0]
  expected = np.full(ids.shape, 255, np.uint8)
  expected[ids == big] = 3
  expected[ids == 26] = 0  # crowd segments keep their category
  expected[ids == 300] = 2
  expected[ids == 70000] = 1
  np.testing.assert_array_equal(example["label"], expected)
  assert (example["label"] == 255).any()
  assert example["image"].shape == (24, 32, 3) and example["name"] == _name(3)
  assert "labels='panoptic'" in repr(source)
  copy = pickle.loads(pickle.dumps(source))
  np.testing.assert_array_equal(copy[0]["label"], expected)


def test_panoptic_bad_data(tmp_path):
  ids = _panoptic_ids()
  big = 5 + 256 * 7 + 65536 * 2
  good = [(big, 184, 0), (26, 1, 1), (300, 125, 0), (70000, 3, 0)]
  write_panoptic(tmp_path, {1: (ids, good), 2: (ids, good[:3]),
                            4: (ids, good[:3] + [(70000, 999, 0)])})
  with pytest.raises(BadExample, match=r"000000000004\.png: segment 70000: unknown category"):
    CocoSegmentation("val", data_dir=str(tmp_path), labels="panoptic")
  source = CocoSegmentation("val", data_dir=str(tmp_path), labels="panoptic",
                            skip_bad_examples=True)
  assert len(source) == 2 and "000000000004.png" in source.skipped[0]
  assert source[0]["label"].shape == (24, 32)
  source.skip_bad_examples = False
  with pytest.raises(BadExample, match=r"000000000002\.png: segment ids \[70000\] are in the "
                                       r"PNG but not in its segments_info"):
    source[1]  # pylint: disable=pointless-statement


# COCO-Stuff ----------------------------------------------------------------------------------

def write_stuff(root, maps, *, split="val"):
  (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
  label_dir = root / "stuffthingmaps_trainval2017" / f"{split}2017"
  label_dir.mkdir(parents=True, exist_ok=True)
  for image_id, values in maps.items():
    Image.new("RGB", values.shape[::-1]).save(root / f"{split}2017" / _name(image_id))
    Image.fromarray(values.astype(np.uint8), "L").save(
        label_dir / _name(image_id).replace(".jpg", ".png"))


def test_stuff_labels(tmp_path):
  raw = np.full((16, 24), 255, np.uint8)
  raw[0, :5] = [0, 2, 12, 89, 91]  # person, car, stop sign (id 13), toothbrush, banner (92)
  raw[1, :3] = [92, 180, 181]  # blanket, window-other, wood
  bad = raw.copy()
  bad[5, 5] = 11  # id 12 was never released: cannot occur
  write_stuff(tmp_path, {1: raw, 2: bad})
  strict = CocoSegmentation("val", data_dir=str(tmp_path), labels="stuff")
  with pytest.raises(BadExample, match=r"000000000002\.png: values \[11\] are not COCO-Stuff"):
    strict[1]  # pylint: disable=pointless-statement
  source = CocoSegmentation("val", data_dir=str(tmp_path), labels="stuff",
                            skip_bad_examples=True)
  assert source.num_classes == 171 and source.palette.shape == (171, 3)
  names = source.class_names
  assert (names[0], names[2], names[11], names[79], names[80], names[170]) == (
      "person", "car", "stop sign", "toothbrush", "banner", "wood")
  label = source[0]["label"]
  assert label[0, :5].tolist() == [0, 2, 11, 79, 80]
  assert label[1, :3].tolist() == [81, 169, 170]
  assert (label[2:] == 255).all()
  assert BAD_KEY in source[1]
