"""CamVid against the real copy in ../shared/data/camvid; Cityscapes against the official
label table of cityscapesscripts, on a tiny dataset in the official layout."""

import pickle

import numpy as np
import pytest
from PIL import Image

from jaxseg.data import CamVid, Cityscapes, get_dataset
from jaxseg.errors import JaxsegError
from tests import helpers


@pytest.fixture(scope="module")
def camvid_val():
  return CamVid("val", data_dir=str(helpers.CAMVID))


def test_camvid_copy_has_the_segnet_split(camvid_val):
  assert len(CamVid("train", data_dir=str(helpers.CAMVID))) == 367 and len(camvid_val) == 101
  assert camvid_val.num_classes == 11 and camvid_val.palette.shape == (11, 3)
  assert camvid_val.class_names[0] == "sky" and camvid_val.class_names[10] == "bicyclist"


@pytest.mark.parametrize("index", [0, 50, 100])
def test_camvid_examples_match_the_files(camvid_val, index):
  example = camvid_val[index]
  stem = example["name"].rsplit(".", 1)[0]
  raw = np.asarray(Image.open(helpers.CAMVID / "valannot" / f"{stem}.png"))
  image = np.asarray(Image.open(helpers.CAMVID / "val" / example["name"]).convert("RGB"))
  assert example["image"].shape == (360, 480, 3) and example["image"].dtype == np.uint8
  np.testing.assert_array_equal(example["image"], image)
  np.testing.assert_array_equal(example["label"], np.where(raw == 11, 255, raw))
  assert set(np.unique(example["label"])) <= set(range(11)) | {255}


def test_camvid_source_pickles_with_a_stable_repr(camvid_val):
  # Grain sends sources to worker processes and compares repr on restore.
  clone = pickle.loads(pickle.dumps(camvid_val))
  assert repr(clone) == repr(camvid_val) and "0x" not in repr(camvid_val)
  np.testing.assert_array_equal(clone[3]["label"], camvid_val[3]["label"])


def test_on_disk_dataset_needs_a_data_dir():
  with pytest.raises(JaxsegError, match="dataset camvid is read from disk: pass --data_dir"):
    get_dataset("camvid", "train")


def _cityscapes(root, ids):
  """Two cities of train images in the official layout; labels hold the given label ids."""
  frames = []
  for city in ("aachen", "bremen"):
    for frame in range(2):
      stem = f"{city}_000000_{frame:06d}"
      image_dir = root / "leftImg8bit" / "train" / city
      label_dir = root / "gtFine" / "train" / city
      image_dir.mkdir(parents=True, exist_ok=True)
      label_dir.mkdir(parents=True, exist_ok=True)
      rng = np.random.default_rng(len(frames))
      label = rng.choice(ids, (8, 16)).astype(np.uint8)
      Image.fromarray(rng.integers(0, 256, (8, 16, 3), dtype=np.uint8)).save(
          image_dir / f"{stem}_leftImg8bit.png")
      Image.fromarray(label).save(label_dir / f"{stem}_gtFine_labelIds.png")
      # The other files of a real gtFine folder are not labels and must be ignored.
      Image.fromarray(label).save(label_dir / f"{stem}_gtFine_instanceIds.png")
      frames.append((stem, label))
  return frames


def test_cityscapes_maps_label_ids_to_train_ids_by_the_official_table(tmp_path):
  from cityscapesscripts.helpers import labels  # pylint: disable=g-import-not-at-top
  ids = [l.id for l in labels.labels if 0 <= l.id < 256]
  frames = _cityscapes(tmp_path, ids)
  source = Cityscapes("train", data_dir=str(tmp_path))
  assert len(source) == 4 and source.num_classes == 19
  assert source.class_names == tuple(labels.trainId2label[i].name for i in range(19))
  np.testing.assert_array_equal(source.palette[13], labels.name2label["car"].color)
  for i, (stem, label) in enumerate(frames):
    example = source[i]
    assert example["name"] == stem
    want = np.vectorize(lambda v: labels.id2label[int(v)].trainId)(label)
    want = np.where((want < 0) | (want == 255), 255, want)  # no train id: ignored
    np.testing.assert_array_equal(example["label"], want)
  assert (source[0]["label"] == 255).any() and (source[0]["label"] == 0).any()


def test_cityscapes_missing_annotation_names_the_file(tmp_path):
  _cityscapes(tmp_path, [7, 8])
  missing = tmp_path / "gtFine/train/bremen/bremen_000000_000001_gtFine_labelIds.png"
  missing.unlink()
  with pytest.raises(JaxsegError, match=f"{missing}: label file is missing"):
    Cityscapes("train", data_dir=str(tmp_path))
  assert len(Cityscapes("train", data_dir=str(tmp_path), skip_bad_examples=True)) == 3
