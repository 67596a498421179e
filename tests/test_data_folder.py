"""Folder datasets (`--dataset=folder`): the layout, masks as ids, colours or binary, images of
any channel count and dtype, the derived val split, one-line errors, statistics, prepare,
and the real CamVid copy rewritten as a folder dataset reading exactly as the CamVid reader."""

import json
import os

import numpy as np
import pytest
import tifffile
from PIL import Image

from jaxseg import data
from jaxseg.data import files, stats, to_folder
from jaxseg.data.files import BAD_KEY, BadExample
from jaxseg.errors import JaxsegError
from tests import helpers

H, W = 12, 16


def write(root, classes, images, masks, split="train"):
  """Writes a folder dataset: `images` {name: array or (suffix, array)}, `masks` {name: uint8
  array (H, W) or (H, W, 3)}; classes.json unless `classes` is None."""
  for kind in ("images", "masks"):
    os.makedirs(os.path.join(root, kind, split), exist_ok=True)
  for name, image in images.items():
    suffix, array = image if isinstance(image, tuple) else (".png", image)
    path = os.path.join(root, "images", split, name + suffix)
    if suffix == ".npy":
      np.save(path, array)
    elif suffix in (".tif", ".tiff"):
      tifffile.imwrite(path, array, photometric="minisblack", planarconfig="contig")
    else:
      Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array
                      ).save(path)
  for name, mask in masks.items():
    Image.fromarray(mask).save(os.path.join(root, "masks", split, name + ".png"))
  if classes is not None:
    with open(os.path.join(root, "classes.json"), "w") as f:
      json.dump(classes, f)
  return str(root)


def rgb(seed=0, shape=(H, W, 3), dtype=np.uint8, high=256):
  return np.random.default_rng(seed).integers(0, high, shape).astype(dtype)


def ids(seed=0, k=3, shape=(H, W)):
  return np.random.default_rng(seed + 100).integers(0, k, shape).astype(np.uint8)


NAMES3 = {"names": ["background", "road", "car"]}


# --- masks -------------------------------------------------------------------------------------


def test_id_masks_and_images_are_read_exactly(tmp_path):
  root = write(tmp_path, {**NAMES3, "ignore_index": 9},
               {f"a{i}": rgb(i) for i in range(3)}, {f"a{i}": ids(i) for i in range(3)})
  mask = ids(1)
  mask[0] = 9  # the ignore value passes
  Image.fromarray(mask).save(os.path.join(root, "masks", "train", "a1.png"))
  write(root, None, {"v": rgb(7)}, {"v": ids(7)}, split="val")
  source = data.get_dataset("folder", "train", data_dir=root)
  assert (len(source), source.num_classes, source.ignore_index) == (3, 3, 9)
  assert (source.in_channels, source.image_dtype) == (3, np.uint8)
  example = source[1]
  np.testing.assert_array_equal(example["image"], rgb(1))
  np.testing.assert_array_equal(example["label"], mask)
  assert example["name"] == "a1"
  # The palette is VOC's when classes.json gives none.
  np.testing.assert_array_equal(source.palette[1], [128, 0, 0])
  val = data.get_dataset("folder", "val", data_dir=root)
  assert len(val) == 1 and not val.derived_val


def test_colour_masks_decode_through_the_palette_and_ignore_colour(tmp_path):
  palette = [[0, 0, 0], [128, 64, 128], [0, 0, 142]]
  expected = ids(0)
  expected[:2] = 200
  colours = np.array(palette + [[0] * 3] * 197 + [[255, 255, 255]], np.uint8)[expected]
  root = write(tmp_path, {**NAMES3, "palette": palette, "ignore_index": 200,
                          "ignore_color": [255, 255, 255]}, {"a": rgb()}, {"a": colours})
  write(root, None, {"a": rgb()}, {"a": colours}, split="val")
  source = data.get_dataset("folder", "val", data_dir=root)
  np.testing.assert_array_equal(source[0]["label"], expected)


@pytest.mark.parametrize("binary,raw,expected", [
    (False, [0, 1], [0, 1]),  # 0/1 as they are
    (True, [0, 255], [0, 1]),  # "binary": true: 255 is the foreground
    (True, [0, 1], [0, 1]),
])
def test_binary_masks(tmp_path, binary, raw, expected):
  mask = np.where(ids(0, k=2) > 0, raw[1], raw[0]).astype(np.uint8)
  classes = {"names": ["background", "lesion"], **({"binary": True} if binary else {})}
  root = write(tmp_path, classes, {"a": rgb(), "b": rgb(1)}, {"a": mask, "b": mask})
  source = data.get_dataset("folder", "train", data_dir=root, val_fraction=0.5)
  np.testing.assert_array_equal(source[0]["label"],
                                np.where(ids(0, k=2) > 0, expected[1], expected[0]))


def test_0_255_masks_without_binary_are_ignore_not_foreground(tmp_path):
  """255 is the default ignore value: a 0/255 mask read without "binary" has no foreground,
  which is why classes.json must say which it means (docs/own_data.md)."""
  mask = np.where(ids(0, k=2) > 0, 255, 0).astype(np.uint8)
  root = write(tmp_path, {"names": ["background", "lesion"]}, {"a": rgb(), "b": rgb(1)},
               {"a": mask, "b": mask})
  label = data.get_dataset("folder", "train", data_dir=root, val_fraction=0.5)[0]["label"]
  assert set(np.unique(label)) == {0, 255}


# --- images of any channel count and dtype ---------------------------------------------------


IMAGES = {
    "grey8.png": (rgb(shape=(H, W, 1)), 1, np.uint8),
    "grey16.png": (rgb(shape=(H, W), dtype=np.uint16, high=65536), 1, np.uint16),
    "rgb.png": (rgb(), 3, np.uint8),
    "rgb.jpg": (None, 3, np.uint8),
    "four16_interleaved.tif": (rgb(shape=(H, W, 4), dtype=np.uint16, high=4096), 4, np.uint16),
    "four16_planar.tif": (rgb(shape=(4, H, W), dtype=np.uint16, high=4096), 4, np.uint16),
    "float.tif": (np.random.default_rng(3).normal(size=(H, W, 2)).astype(np.float32), 2,
                  np.float32),
    "bands.npy": (np.random.default_rng(4).normal(size=(H, W, 6)).astype(np.float64), 6,
                  np.float32),
    "int16.npy": (rgb(shape=(H, W, 5), dtype=np.int16, high=1000) - 500, 5, np.float32),
}


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_read_array_keeps_channels_and_values(tmp_path, name):
  array, channels, dtype = IMAGES[name]
  path = str(tmp_path / name)
  if name.endswith(".npy"):
    np.save(path, array)
  elif name.endswith(".tif"):
    tifffile.imwrite(path, array, planarconfig="separate" if "planar" in name else "contig",
                     photometric="minisblack")
  elif name.endswith(".jpg"):
    Image.fromarray(rgb()).save(path, quality=95)
    array = np.asarray(Image.open(path))
  else:
    Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array
                    ).save(path)
  image = files.read_array(path)
  assert image.shape == (H, W, channels) and image.dtype == dtype
  # From the header alone: what read_array gives, and the size.
  assert files.probe_array(path) == (channels, np.dtype(dtype), (H, W))
  expected = np.moveaxis(array, 0, -1) if "planar" in name else array
  np.testing.assert_array_equal(image, np.asarray(expected, dtype).reshape(H, W, channels))


def test_a_folder_of_4_band_tiffs_is_one_source(tmp_path):
  bands = {f"t{i}": (".tif", rgb(i, (H, W, 4), np.uint16, 65536)) for i in range(4)}
  root = write(tmp_path, NAMES3, bands, {k: ids(i) for i, k in enumerate(bands)})
  source = data.get_dataset("folder", "train", data_dir=root, val_fraction=0.25)
  assert (source.in_channels, source.image_dtype, len(source)) == (4, np.uint16, 3)
  assert data.channels(source) == (4, np.uint16)
  assert all(source[i]["image"].shape == (H, W, 4) for i in range(3))


# --- the val split ------------------------------------------------------------------------------


def _names(source):
  return [source[i]["name"] for i in range(len(source))]


def test_val_is_a_seeded_fraction_of_train_when_masks_val_is_absent(tmp_path):
  n = 20
  root = write(tmp_path, NAMES3, {f"x{i:02d}": rgb(i) for i in range(n)},
               {f"x{i:02d}": ids(i) for i in range(n)})
  train = data.get_dataset("folder", "train", data_dir=root, val_fraction=0.2, seed=3)
  val = data.get_dataset("folder", "val", data_dir=root, val_fraction=0.2, seed=3)
  assert (len(train), len(val)) == (16, 4)
  assert sorted(_names(train) + _names(val)) == [f"x{i:02d}" for i in range(n)]
  again = data.get_dataset("folder", "val", data_dir=root, val_fraction=0.2, seed=3)
  assert _names(again) == _names(val)  # the same on every run
  other = data.get_dataset("folder", "val", data_dir=root, val_fraction=0.2, seed=4)
  assert _names(other) != _names(val)
  # What the split is goes into the source's identity (resume and prepared data compare it).
  assert "val_fraction=0.2, seed=3" in repr(val)
  with pytest.raises(JaxsegError, match="at least 2"):
    write(tmp_path / "one", NAMES3, {"a": rgb()}, {"a": ids()})
    data.get_dataset("folder", "val", data_dir=str(tmp_path / "one"))


# --- one-line errors ------------------------------------------------------------------------------


def _two(tmp_path, classes=NAMES3, **changes):
  images = {"a": rgb(), "b": rgb(1)}
  masks = {"a": ids(), "b": ids(1)}
  images.update(changes.get("images", {}))
  masks.update(changes.get("masks", {}))
  return write(tmp_path, classes, images, masks)


def _class_file(tmp_path, text):
  root = _two(tmp_path)
  (tmp_path / "classes.json").write_text(text)
  return root


ERRORS = {
    "image without mask": (
        lambda p: _two(p, images={"c": rgb(2)}), r"images/train/c\.png: image has no mask"),
    "mask without image": (
        lambda p: _two(p, masks={"d": ids(3)}), r"masks/train/d\.png: mask has no image"),
    "empty split": (
        lambda p: write(p, NAMES3, {}, {}), "split train is empty"),
    "not JSON": (
        lambda p: _class_file(p, '{"names": ["a", "b",]}'), r"classes\.json: not valid JSON"),
    "no names": (
        lambda p: _class_file(p, '{"palette": []}'), r'classes\.json: has no "names"'),
    "more than 255 classes": (
        lambda p: _class_file(p, json.dumps({"names": [f"c{i}" for i in range(256)]})),
        "256 classes; at most 255"),
    "no classes.json, binary masks": (
        lambda p: write(p, None, {"a": rgb()}, {"a": np.where(ids() > 0, 255, 0).astype(np.uint8)}),
        r'classes\.json is missing; write \{"names": \["background", "foreground"\], "binary": '
        r'true\} there'),
    "no classes.json": (
        lambda p: _two(p, classes=None),
        r"classes\.json is missing; write \{\"names\": \[\"class0\", \"class1\", \"class2\"\]\} "
        r"there \(the first 2 train masks hold ids \[0, 1, 2\]\)"),
    "binary with 3 names": (
        lambda p: _class_file(p, json.dumps({"names": ["a", "b", "c"], "binary": True})),
        "needs exactly 2 names"),
    "ignore index is a class": (
        lambda p: _class_file(p, json.dumps({"names": ["a", "b"], "ignore_index": 1})),
        '"ignore_index" 1 is a class id'),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_layouts_are_one_line_errors(tmp_path, case):
  make, message = ERRORS[case]
  root = make(tmp_path)
  with pytest.raises(JaxsegError, match=message) as error:
    data.get_dataset("folder", "train", data_dir=root)
  assert "\n" not in str(error.value)


EXAMPLE_ERRORS = {
    "size mismatch": (
        {"masks": {"b": ids(1, shape=(H, W + 1))}}, r"masks/train/b\.png: mask is 17x12 but "
                                                    r"its image .*b\.png is 16x12"),
    "unknown colour": (
        {"masks": {"b": np.full((H, W, 3), 7, np.uint8)}},
        r"b\.png: colour \[7, 7, 7\] \(192 pixels\) is not in the \"palette\""),
    "class id above the count": (
        {"masks": {"b": np.full((H, W), 5, np.uint8)}},
        r"b\.png: label values \[5\] are outside 0\.\.2"),
}


@pytest.mark.parametrize("case", sorted(EXAMPLE_ERRORS))
def test_bad_examples_are_one_line_errors_or_skipped(tmp_path, case):
  changes, message = EXAMPLE_ERRORS[case]
  classes = {**NAMES3, "palette": [[0, 0, 0], [1, 1, 1], [2, 2, 2]]}
  if case == "unknown colour":  # "a" must decode too
    changes = {"masks": {**changes["masks"], "a": np.zeros((H, W, 3), np.uint8)}}
  root = _two(tmp_path, classes=classes, **changes)
  os.makedirs(tmp_path / "masks" / "val")  # both examples in train
  source = data.get_dataset("folder", "train", data_dir=root)
  index = next(i for i in range(2) if source._records[i][0].rsplit("/", 1)[1].startswith("b"))
  with pytest.raises(BadExample, match=message) as error:
    source[index]  # pylint: disable=pointless-statement
  assert "\n" not in str(error.value)
  skipping = data.get_dataset("folder", "train", data_dir=root, skip_bad_examples=True)
  assert BAD_KEY in skipping[index] and BAD_KEY not in skipping[1 - index]


@pytest.mark.parametrize("odd, message", [
    (rgb(1, (H, W, 1)), r"c\.png: image has 1 channel\(s\) of uint8, but 2 of the split's 3 "
                        r"images have 3 of uint8"),
    ((".npy", rgb(1, dtype=np.float32)), r"c\.npy: image has 3 channel\(s\) of float32, but 2 "
                                         r"of the split's 3 images have 3 of uint8"),
])
def test_an_image_of_another_format_is_found_when_the_split_is_listed(tmp_path, odd, message):
  """Every image's header is read when the split is listed: the split's format is the one
  most images have (an odd one sorting first does not decide it), and the odd one is named
  before anything trains, or skipped."""
  root = write(tmp_path, NAMES3, {"c": odd, "d": rgb(2), "e": rgb(3)},
               {"c": ids(1), "d": ids(2), "e": ids(3)})
  os.makedirs(tmp_path / "masks" / "val")
  with pytest.raises(BadExample, match=message):
    data.get_dataset("folder", "train", data_dir=root)
  source = data.get_dataset("folder", "train", data_dir=root, skip_bad_examples=True)
  assert len(source) == 2 and data.channels(source) == (3, np.uint8)
  assert len(source.skipped) == 1 and "c." in source.skipped[0]


def test_palette_mode_masks_are_ids_unless_their_colours_say_otherwise(tmp_path):
  """Pascal VOC's masks: palette PNGs whose index is the class id and whose colours are the
  class colours. A palette PNG whose editor reordered the colours is read by its colours."""
  palette = [[0, 0, 0], [128, 64, 128], [0, 0, 142]]
  expected = ids(0)
  voc_like = Image.fromarray(expected, "P")
  voc_like.putpalette(sum(palette, []))
  reordered = Image.fromarray(np.array([0, 2, 1], np.uint8)[expected], "P")
  reordered.putpalette(sum([palette[0], palette[2], palette[1]], []))
  root = write(tmp_path, {**NAMES3, "palette": palette}, {"a": rgb(), "b": rgb(1)}, {})
  voc_like.save(tmp_path / "masks" / "train" / "a.png")
  reordered.save(tmp_path / "masks" / "train" / "b.png")
  os.makedirs(tmp_path / "masks" / "val")
  source = data.get_dataset("folder", "train", data_dir=root)
  np.testing.assert_array_equal(source[0]["label"], expected)
  np.testing.assert_array_equal(source[1]["label"], expected)


def test_tiffs_in_every_layout_tifffile_writes(tmp_path):
  """tifffile stores a 3-D array that is not RGB as pages of its last two axes, whether it
  was (C, H, W) or (H, W, C): the smaller end axis is the bands. Samples axes (interleaved,
  or planar as GDAL writes) say where the bands are."""
  bands = rgb(5, (20, 30, 13), np.uint16, 4096)
  layouts = {"hwc13": (bands, {}), "chw13": (np.moveaxis(bands, -1, 0), {}),
             "hwc5": (bands[..., :5], {}),
             "planar": (np.moveaxis(bands[..., :4], -1, 0),
                        dict(photometric="minisblack", planarconfig="separate"))}
  for name, (array, options) in layouts.items():
    path = str(tmp_path / f"{name}.tif")
    tifffile.imwrite(path, array, **options)
    image = files.read_array(path)
    c = image.shape[-1]
    np.testing.assert_array_equal(image, bands[..., :c], err_msg=name)
    assert files.probe_array(path) == (c, np.dtype(np.uint16), (20, 30)), name


def test_val_images_of_different_sizes_are_one_line_before_training(tmp_path):
  from jaxseg.data import from_config  # pylint: disable=g-import-not-at-top
  root = _two(tmp_path, images={"b": rgb(1, (H + 2, W, 3))}, masks={"b": ids(1, shape=(H + 2, W))})
  write(root, None, {"v": rgb(), "w": rgb(1, (H + 2, W, 3))},
        {"v": ids(), "w": ids(1, shape=(H + 2, W))}, split="val")
  config = helpers.tiny_config(**{"data.name": "folder", "data.data_dir": root})
  with pytest.raises(JaxsegError, match=r"val images differ in size \(\(12, 16\), \(14, 16\) "
                                        r"HxW, \.\.\.\); set --config.data.eval_size=H,W"):
    from_config.make_data(config, str(tmp_path), 8)
  config.data.eval_size = (16, 16)
  data_ = from_config.make_data(config, str(tmp_path), 8)
  assert data_.image_shape == (H, W, 3)  # crops default to the first train image's size


def test_unpaired_files_are_skipped_and_listed_with_skip_bad_examples(tmp_path):
  root = _two(tmp_path, images={"c": rgb(2)}, masks={"d": ids(3)})
  os.makedirs(tmp_path / "masks" / "val")
  source = data.get_dataset("folder", "train", data_dir=root, skip_bad_examples=True)
  assert len(source) == 2 and len(source.skipped) == 2
  assert "c.png: image has no mask" in source.skipped[0]
  assert "d.png: mask has no image" in source.skipped[1]


# --- statistics -------------------------------------------------------------------------------


def test_statistics_equal_numpy_over_every_pixel(tmp_path):
  images = {f"t{i}": (".tif", rgb(i, (H + i, W, 4), np.uint16, 65536)) for i in range(5)}
  masks = {f"t{i}": ids(i, k=3, shape=(H + i, W)) for i in range(5)}
  masks["t0"][:] = 0  # class 2 absent from one image: its frequency's denominator shrinks
  root = write(tmp_path, NAMES3, images, masks)
  os.makedirs(tmp_path / "masks" / "val")
  source = data.get_dataset("folder", "train", data_dir=root)
  computed = stats.compute(source, desc=None)
  pixels = np.concatenate([a.reshape(-1, 4) for _, a in images.values()]).astype(np.float64)
  np.testing.assert_allclose(computed["mean"], pixels.mean(0), rtol=1e-12)
  np.testing.assert_allclose(computed["std"], pixels.std(0), rtol=1e-10)
  labels = [m.ravel() for m in masks.values()]
  counts = np.stack([np.bincount(m, minlength=3) for m in labels])
  assert computed["class_pixels"] == counts.sum(0).tolist()
  present = [(counts[:, k] > 0) @ np.array([m.size for m in labels]) for k in range(3)]
  assert computed["present_pixels"] == present
  # Eigen & Fergus: median frequency over frequency.
  freq = counts.sum(0) / np.array(present)
  np.testing.assert_allclose(stats.median_frequency_weights(computed), np.median(freq) / freq)


def test_statistics_are_cached_per_source(tmp_path, monkeypatch):
  root = _two(tmp_path)
  train = data.get_dataset("folder", "train", data_dir=root, val_fraction=0.5)
  first = stats.cached(train, str(tmp_path))
  assert os.path.exists(tmp_path / stats.CACHE_FILE)
  monkeypatch.setattr(stats, "compute", lambda *a, **k: pytest.fail("recomputed"))
  assert stats.cached(train, str(tmp_path)) == first
  val = data.get_dataset("folder", "val", data_dir=root, val_fraction=0.5)
  with pytest.raises(pytest.fail.Exception):  # another source: not the cached one
    stats.cached(val, str(tmp_path))


# --- prepare, to_folder and the real CamVid copy ---------------------------------------------


def test_prepare_keeps_16_bit_4_band_images_exactly(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  from jaxseg.data import prepare  # pylint: disable=g-import-not-at-top
  bands = {f"t{i}": (".tif", rgb(i, (H, W, 4), np.uint16, 65536)) for i in range(4)}
  root = write(tmp_path / "raw", NAMES3, bands, {k: ids(i) for i, k in enumerate(bands)})
  prepare.prepare("folder", str(tmp_path / "prepared"), data_dir=root,
                  dataset_options={"val_fraction": 0.25})
  for split in ("train", "val"):
    raw = data.get_dataset("folder", split, data_dir=root, val_fraction=0.25)
    ready = data.get_dataset("folder", split, data_dir=str(tmp_path / "prepared"),
                             val_fraction=0.25)
    assert data.channels(ready) == (4, np.uint16) and len(ready) == len(raw)
    for i in range(len(raw)):
      np.testing.assert_array_equal(ready[i]["image"], raw[i]["image"])
      assert ready[i]["image"].dtype == np.uint16
      np.testing.assert_array_equal(ready[i]["label"], raw[i]["label"])
  with pytest.raises(JaxsegError, match="prepared with val_fraction=0.25"):
    data.get_dataset("folder", "train", data_dir=str(tmp_path / "prepared"), val_fraction=0.1)


@pytest.fixture(scope="module")
def camvid_folder(tmp_path_factory):
  """The real CamVid copy rewritten as a folder dataset with colour-coded masks."""
  root = str(tmp_path_factory.mktemp("camvid_folder"))
  to_folder.export("camvid", root, data_dir=str(helpers.CAMVID), masks="colour")
  return root


def test_camvid_as_a_folder_reads_exactly_as_the_camvid_reader(camvid_folder):
  with open(os.path.join(camvid_folder, "classes.json")) as f:
    classes = json.load(f)
  assert classes["ignore_color"] == [255, 255, 255] and len(classes["palette"]) == 11
  # The masks really are colours (void is white), not ids.
  mask = np.asarray(Image.open(os.path.join(camvid_folder, "masks", "val",
                                            sorted(os.listdir(os.path.join(
                                                camvid_folder, "masks", "val")))[0])))
  assert mask.ndim == 3 and mask.shape[-1] == 3
  for split in ("train", "val"):
    mine = data.get_dataset("folder", split, data_dir=camvid_folder)
    theirs = data.get_dataset("camvid", split, data_dir=str(helpers.CAMVID))
    assert len(mine) == len(theirs) and not mine.derived_val
    assert mine.class_names == theirs.class_names
    np.testing.assert_array_equal(mine.palette, theirs.palette)
    for i in range(0, len(mine), 9):
      np.testing.assert_array_equal(mine[i]["image"], theirs[i]["image"])
      np.testing.assert_array_equal(mine[i]["label"], theirs[i]["label"])
