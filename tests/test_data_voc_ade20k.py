"""Pascal VOC 2012 (with SBD's train_aug) and ADE20K on tiny datasets built in their official
layouts: labels pixel for pixel, split membership, and the one-line errors."""

import pickle

import numpy as np
import pytest
import scipy.io
import scipy.sparse
from PIL import Image

from jaxseg.data.ade20k import ADE20K, reduce_zero_label_table
from jaxseg.data.files import BAD_KEY, BadExample
from jaxseg.data.voc import PascalVOC
from jaxseg.errors import JaxsegError

H, W = 12, 16
VOC_TRAIN = ("2007_000032", "2007_000039")
VOC_VAL = ("2007_000033", "2007_000042")
# SBD lists overlap VOC's on purpose: 2007_000039 (VOC train, so its VOC PNG must win),
# 2007_000032 (in both, listed twice in all) and 2007_000033 (VOC val, so never in train_aug).
SBD_TRAIN = ("2008_000002", "2007_000039", "2007_000033", "2008_000003")
SBD_VAL = ("2008_000007", "2007_000032")


def _jpeg(path, seed):
  path.parent.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path)


def _ids(seed, num_classes):
  return np.random.default_rng(seed).integers(0, num_classes, (H, W)).astype(np.uint8)


def _voc(root):
  """VOCdevkit/VOC2012 with train/val/trainval lists, JPEGs of every name (SBD's too, as on
  the real data) and palette PNGs of the VOC names with 255 borders."""
  voc = root / "VOCdevkit" / "VOC2012"
  lists = voc / "ImageSets" / "Segmentation"
  lists.mkdir(parents=True)
  for split, names in (("train", VOC_TRAIN), ("val", VOC_VAL),
                       ("trainval", VOC_TRAIN + VOC_VAL)):
    (lists / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
  labels = {}
  for i, name in enumerate(sorted(set(VOC_TRAIN + VOC_VAL + SBD_TRAIN + SBD_VAL))):
    _jpeg(voc / "JPEGImages" / f"{name}.jpg", i)
  (voc / "SegmentationClass").mkdir()
  for i, name in enumerate(VOC_TRAIN + VOC_VAL):
    label = _ids(i, 21)
    label[0, :] = label[:, 0] = 255  # VOC's void border
    png = Image.fromarray(label)
    png.putpalette(PascalVOC.palette.tobytes())  # an L image with a palette becomes P
    png.save(voc / "SegmentationClass" / f"{name}.png")
    labels[name] = label
  return voc, labels


def _sbd(root):
  """benchmark_RELEASE/dataset with cls/NAME.mat in SBD's structure and train/val lists."""
  sbd = root / "benchmark_RELEASE" / "dataset"
  (sbd / "cls").mkdir(parents=True)
  (sbd / "train.txt").write_text("".join(f"{n}\n" for n in SBD_TRAIN))
  (sbd / "val.txt").write_text("".join(f"{n}\n" for n in SBD_VAL))
  labels = {}
  for i, name in enumerate(SBD_TRAIN + SBD_VAL):
    label = _ids(100 + i, 21)  # differs from the VOC PNG of the same name
    present = np.unique(label[label > 0]).astype(np.uint8)
    boundaries = np.empty((20, 1), object)
    for c in range(20):
      boundaries[c, 0] = scipy.sparse.csc_matrix(
          (label == c + 1) & (np.roll(label, 1, 0) != c + 1), dtype=bool)
    scipy.io.savemat(sbd / "cls" / f"{name}.mat", {"GTcls": {
        "Segmentation": label, "Boundaries": boundaries, "CategoriesPresent": present[:, None]}})
    labels[name] = label
  return sbd, labels


@pytest.fixture
def voc(tmp_path):
  voc_dir, voc_labels = _voc(tmp_path)
  sbd_dir, sbd_labels = _sbd(tmp_path)
  return voc_dir, voc_labels, sbd_dir, sbd_labels


def test_voc_palette_is_the_standard_colour_map():
  palette = PascalVOC.palette
  assert palette.shape == (21, 3) and palette.dtype == np.uint8
  assert PascalVOC.class_names[1] == "aeroplane" and PascalVOC.class_names[15] == "person"
  for index, colour in ((0, (0, 0, 0)), (1, (128, 0, 0)), (2, (0, 128, 0)),
                        (8, (64, 0, 0)), (15, (192, 128, 128)), (20, (0, 64, 128))):
    assert tuple(palette[index]) == colour, PascalVOC.class_names[index]


@pytest.mark.parametrize("split,names", [("train", VOC_TRAIN), ("val", VOC_VAL),
                                         ("trainval", VOC_TRAIN + VOC_VAL)])
def test_voc_splits_read_the_pngs_class_ids_and_void(voc, split, names):
  voc_dir, voc_labels, _, _ = voc
  # The VOCdevkit parent and the VOC2012 folder itself name the same data.
  for data_dir in (voc_dir.parent, voc_dir):
    source = PascalVOC(split, data_dir=str(data_dir))
    assert len(source) == len(names) and source.num_classes == 21
    for i, name in enumerate(sorted(names)):
      example = source[i]
      assert example["name"] == name and "label_file" not in example
      image = np.asarray(Image.open(voc_dir / "JPEGImages" / f"{name}.jpg").convert("RGB"))
      np.testing.assert_array_equal(example["image"], image)
      np.testing.assert_array_equal(example["label"], voc_labels[name])
      assert (example["label"] == 255).any()


def test_voc_train_aug_is_voc_train_and_sbd_minus_voc_val(voc):
  voc_dir, voc_labels, sbd_dir, sbd_labels = voc
  source = PascalVOC("train_aug", data_dir=str(voc_dir.parent), sbd_dir=str(sbd_dir.parent))
  want = sorted((set(VOC_TRAIN) | set(SBD_TRAIN) | set(SBD_VAL)) - set(VOC_VAL))
  assert want == ["2007_000032", "2007_000039", "2008_000002", "2008_000003", "2008_000007"]
  assert [source[i]["name"] for i in range(len(source))] == want
  for i, name in enumerate(want):
    label = source[i]["label"]
    if name in VOC_TRAIN:  # VOC's annotation wins over SBD's, whose map differs
      assert not np.array_equal(voc_labels[name], sbd_labels[name])
      np.testing.assert_array_equal(label, voc_labels[name])
    else:
      np.testing.assert_array_equal(label, sbd_labels[name])
  # SBD's dataset/ folder itself works too; other splits do not read SBD at all.
  assert len(PascalVOC("train_aug", data_dir=str(voc_dir), sbd_dir=str(sbd_dir))) == 5
  val = PascalVOC("val", data_dir=str(voc_dir), sbd_dir=str(sbd_dir))
  assert "sbd_dir=None" in repr(val) and len(val) == 2


def test_voc_source_pickles_with_a_stable_repr(voc):
  voc_dir, _, sbd_dir, _ = voc
  source = PascalVOC("train_aug", data_dir=str(voc_dir), sbd_dir=str(sbd_dir))
  clone = pickle.loads(pickle.dumps(source))
  assert repr(clone) == repr(source) and "examples=5" in repr(source)
  np.testing.assert_array_equal(clone[2]["label"], source[2]["label"])


def test_voc_errors_are_one_line_and_name_the_file(voc, tmp_path):
  voc_dir, _, sbd_dir, _ = voc
  with pytest.raises(JaxsegError, match="unknown Pascal VOC split 'test'; valid splits: train, "
                     "val, trainval, train_aug"):
    PascalVOC("test", data_dir=str(voc_dir))
  with pytest.raises(JaxsegError, match="'train_aug' needs SBD's annotations: set "
                     "data.options.sbd_dir"):
    PascalVOC("train_aug", data_dir=str(voc_dir))
  with pytest.raises(JaxsegError, match=f"{tmp_path}: not a Pascal VOC 2012 folder .*"
                     f"{tmp_path}/VOC2012"):
    PascalVOC("train", data_dir=str(tmp_path))
  with pytest.raises(JaxsegError, match=f"{voc_dir}: not an SBD folder"):
    PascalVOC("train_aug", data_dir=str(voc_dir), sbd_dir=str(voc_dir))
  val_list = voc_dir / "ImageSets" / "Segmentation" / "val.txt"
  val_list.unlink()
  with pytest.raises(JaxsegError, match=f"{val_list}: no such file"):
    PascalVOC("val", data_dir=str(voc_dir))
  with pytest.raises(JaxsegError, match=f"{val_list}: no such file"):
    PascalVOC("train_aug", data_dir=str(voc_dir), sbd_dir=str(sbd_dir))


def test_voc_missing_files_name_image_and_label_or_are_skipped(voc):
  voc_dir, _, sbd_dir, _ = voc
  image = voc_dir / "JPEGImages" / "2007_000039.jpg"
  image.unlink()
  png = voc_dir / "SegmentationClass" / "2007_000039.png"
  with pytest.raises(BadExample) as error:
    PascalVOC("train", data_dir=str(voc_dir))
  message = str(error.value)
  assert message.startswith(f"{image}: image file is missing (label {png}") and "\n" not in message
  source = PascalVOC("train", data_dir=str(voc_dir), skip_bad_examples=True)
  assert len(source) == 1 and len(source.skipped) == 1 and str(image) in source.skipped[0]

  # train_aug: a name with neither VOC PNG nor SBD .mat names the .mat, the image and the PNG
  # looked for first; every problem is counted in the one line.
  mat = sbd_dir / "cls" / "2008_000003.mat"
  mat.unlink()
  with pytest.raises(BadExample, match=r"2007_000039.jpg: image file is missing .*\(and 1 more\)"):
    PascalVOC("train_aug", data_dir=str(voc_dir), sbd_dir=str(sbd_dir))
  source = PascalVOC("train_aug", data_dir=str(voc_dir), sbd_dir=str(sbd_dir),
                     skip_bad_examples=True)
  assert len(source) == 3 and len(source.skipped) == 2
  jpg = voc_dir / "JPEGImages" / "2008_000003.jpg"
  png = voc_dir / "SegmentationClass" / "2008_000003.png"
  assert source.skipped[1] == (f"{mat}: label file is missing (image {jpg}; {png} is missing "
                               f"too; listed in {sbd_dir / 'train.txt'})")


def test_voc_unreadable_sbd_annotation_is_a_bad_example(voc):
  voc_dir, _, sbd_dir, _ = voc
  mat = sbd_dir / "cls" / "2008_000002.mat"
  mat.write_bytes(mat.read_bytes()[:150])  # truncated
  source = PascalVOC("train_aug", data_dir=str(voc_dir), sbd_dir=str(sbd_dir))
  index = 2
  with pytest.raises(BadExample, match=f"{mat}: not a readable SBD annotation"):
    source[index]  # pylint: disable=pointless-statement
  scipy.io.savemat(mat, {"something_else": np.zeros((H, W), np.uint8)})
  with pytest.raises(BadExample, match=f"{mat}: not a readable SBD annotation.*KeyError"):
    source[index]  # pylint: disable=pointless-statement
  scipy.io.savemat(mat, {"GTcls": {"Segmentation": np.zeros((H + 1, W), np.uint8)}})
  with pytest.raises(BadExample, match=f"{mat}: label is 16x13 but its image"):
    source[index]  # pylint: disable=pointless-statement
  skipping = PascalVOC("train_aug", data_dir=str(voc_dir), sbd_dir=str(sbd_dir),
                       skip_bad_examples=True)
  assert str(mat) in skipping[index][BAD_KEY]


def _ade(root, split_folder="validation", raws=None):
  """ADEChallengeData2016 with three images of one split; raw annotation values 0..150."""
  ade = root / "ADEChallengeData2016"
  prefix = "train" if split_folder == "training" else "val"
  raws = raws or [_ids(i, 151) for i in range(3)]
  (ade / "annotations" / split_folder).mkdir(parents=True)
  stems = []
  for i, raw in enumerate(raws):
    stem = f"ADE_{prefix}_{i + 1:08d}"
    _jpeg(ade / "images" / split_folder / f"{stem}.jpg", i)
    Image.fromarray(raw).save(ade / "annotations" / split_folder / f"{stem}.png")
    stems.append(stem)
  return ade, stems, raws


def test_ade20k_reduces_the_zero_label_as_mmseg():
  table = reduce_zero_label_table()
  # mmseg's LoadAnnotations on every uint8 value at once.
  raw = np.arange(256, dtype=np.uint8)
  mmseg = raw.copy()
  mmseg[mmseg == 0] = 255
  mmseg = mmseg - 1
  mmseg[mmseg == 254] = 255
  np.testing.assert_array_equal(table, mmseg)
  assert table[0] == 255 and table[1] == 0 and table[150] == 149 and table[255] == 255


def test_ade20k_class_table_has_150_names_and_colours():
  assert len(ADE20K.class_names) == 150 == len(set(ADE20K.class_names))
  assert ADE20K.palette.shape == (150, 3) and ADE20K.palette.dtype == np.uint8
  assert ADE20K.class_names[0] == "wall" and tuple(ADE20K.palette[0]) == (120, 120, 120)
  assert ADE20K.class_names[7] == "bed"  # mmseg's "bed " without its stray space
  assert ADE20K.class_names[12] == "person" and tuple(ADE20K.palette[12]) == (150, 5, 61)
  assert ADE20K.class_names[149] == "flag" and tuple(ADE20K.palette[149]) == (92, 0, 255)


@pytest.mark.parametrize("split,folder", [("train", "training"), ("val", "validation")])
def test_ade20k_labels_are_raw_minus_one_with_zero_ignored(tmp_path, split, folder):
  raws = [_ids(i, 151) for i in range(3)]
  raws[1][0, :3] = (0, 150, 255)  # 255 is not a class: ignored, as mmseg's rule leaves it
  ade, stems, raws = _ade(tmp_path, folder, raws)
  for data_dir in (tmp_path, ade):  # the archive's folder or its parent
    source = ADE20K(split, data_dir=str(data_dir))
    assert len(source) == 3 and source.num_classes == 150
    for i, (stem, raw) in enumerate(zip(stems, raws)):
      example = source[i]
      assert example["name"] == stem and example["image"].shape == (H, W, 3)
      want = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
      want[raw == 255] = 255
      np.testing.assert_array_equal(example["label"], want)
    assert tuple(source[1]["label"][0, :3]) == (255, 149, 255)
  assert repr(source) == f"ADE20K(split={split!r}, data_dir={str(ade)!r}, examples=3)"


def test_ade20k_errors_name_the_file(tmp_path):
  raws = [_ids(i, 151) for i in range(3)]
  raws[2][5, 5] = 151  # no class of the benchmark
  ade, stems, _ = _ade(tmp_path, "validation", raws)
  with pytest.raises(JaxsegError, match="unknown ADE20K split 'test'; valid splits: train, val"):
    ADE20K("test", data_dir=str(ade))
  with pytest.raises(JaxsegError, match=f"{ade}/images/training: no such directory"):
    ADE20K("train", data_dir=str(ade))
  with pytest.raises(JaxsegError, match=f"{ade}/images: not an ADE20K folder"):
    ADE20K("val", data_dir=str(ade / "images"))
  source = ADE20K("val", data_dir=str(ade))
  bad_label = ade / "annotations" / "validation" / f"{stems[2]}.png"
  with pytest.raises(BadExample, match=f"{bad_label}: label values \\[150\\] are outside 0..149"):
    source[2]  # pylint: disable=pointless-statement
  missing = ade / "annotations" / "validation" / f"{stems[0]}.png"
  missing.unlink()
  with pytest.raises(BadExample, match=f"{missing}: label file is missing"):
    ADE20K("val", data_dir=str(ade))
  assert len(ADE20K("val", data_dir=str(ade), skip_bad_examples=True)) == 2
