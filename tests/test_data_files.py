"""Reading images and labels from disk: every PIL mode to HxWx3 uint8, and every kind of bad
file is a one-line error naming it (or, with skip_bad_examples, a skipped example)."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from jaxseg.data import CamVid, files, pipeline
from jaxseg.errors import JaxsegError

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (12, 16, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "LA", "CMYK", "I;16", "P+transparency"])
def test_every_image_mode_reads_as_hxwx3_uint8(tmp_path, mode):
  image = Image.fromarray(RGB)
  if mode == "I;16":
    image = Image.fromarray((RGB[..., 0].astype(np.uint16) * 257))  # 16-bit grey
  elif mode == "P+transparency":
    image = image.convert("P")
    image.info["transparency"] = 0
  else:
    image = image.convert(mode)
  path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
  image.save(path)
  got = files.read_image(str(path))
  assert got.shape == (12, 16, 3) and got.dtype == np.uint8
  if mode in ("RGB", "RGBA"):
    np.testing.assert_array_equal(got, RGB)  # alpha dropped, colours untouched
  elif mode == "I;16":
    np.testing.assert_array_equal(got[..., 1], RGB[..., 0])  # 16 bits scaled, not clipped
  elif mode in ("L", "LA"):
    want = np.asarray(Image.fromarray(RGB).convert("L"))
    np.testing.assert_array_equal(got, np.repeat(want[..., None], 3, -1))
  elif mode == "CMYK":  # JPEG: lossy, but the colours must come back near the original
    assert np.abs(got.astype(int) - RGB).mean() < 12


def _jpeg_bytes():
  buffer = io.BytesIO()
  Image.fromarray(np.tile(RGB, (8, 8, 1))).save(buffer, "JPEG", quality=95)
  return buffer.getvalue()


def _png_bytes():
  buffer = io.BytesIO()
  Image.fromarray(np.tile(RGB, (8, 8, 1))).save(buffer, "PNG")
  return buffer.getvalue()


@pytest.mark.parametrize("name, content, message", [
    ("empty.png", b"", r"empty\.png: image file is empty \(0 bytes\)"),
    ("garbage.jpg", b"this is not an image at all", r"garbage\.jpg: not a readable image"),
    ("truncated.jpg", _jpeg_bytes()[:900], r"truncated\.jpg: corrupt or truncated image"),
    ("truncated.png", _png_bytes()[:700], r"truncated\.png: corrupt or truncated image"),
])
def test_unreadable_images_are_errors_never_grey_fill(tmp_path, name, content, message):
  path = tmp_path / name
  path.write_bytes(content)
  with pytest.raises(files.BadExample, match=message):
    files.read_image(str(path))


def test_truncated_image_is_refused_even_if_someone_enabled_truncated_loading(tmp_path):
  from PIL import ImageFile  # pylint: disable=g-import-not-at-top
  path = tmp_path / "t.jpg"
  path.write_bytes(_jpeg_bytes()[:900])
  ImageFile.LOAD_TRUNCATED_IMAGES = True
  try:
    with pytest.raises(files.BadExample, match="truncated"):
      files.read_image(str(path))
    assert ImageFile.LOAD_TRUNCATED_IMAGES  # the caller's setting is restored
  finally:
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_labels_must_be_single_channel(tmp_path):
  Image.fromarray(RGB).save(tmp_path / "rgb.png")
  with pytest.raises(files.BadExample, match=r"rgb\.png: label has mode RGB \(3 channels\)"):
    files.read_label(str(tmp_path / "rgb.png"))
  palette = Image.fromarray(RGB[..., 0] % 5).convert("P")  # a VOC-style palette label
  palette.save(tmp_path / "p.png")
  np.testing.assert_array_equal(files.read_label(str(tmp_path / "p.png")), RGB[..., 0] % 5)
  Image.fromarray(np.full((4, 4), 300, np.uint16)).save(tmp_path / "wide.png")
  with pytest.raises(files.BadExample, match=r"wide\.png: label values 300..300 do not fit"):
    files.read_label(str(tmp_path / "wide.png"))


def _camvid(root, n=4, size=(12, 16)):
  """A CamVid-layout folder: PNG images for train, JPEG for val, void (11) in every label."""
  for split, suffix in (("train", ".png"), ("val", ".jpg")):
    (root / split).mkdir(parents=True)
    (root / f"{split}annot").mkdir()
    for i in range(n):
      label = RNG.integers(0, 12, size, dtype=np.uint8)
      Image.fromarray(RNG.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
          root / split / f"f{i}{suffix}")
      Image.fromarray(label).save(root / f"{split}annot" / f"f{i}.png")
  return root


def _break(root, case):
  """Damages example f1 of the train split; returns the file the error must name."""
  image, label = root / "train" / "f1.png", root / "trainannot" / "f1.png"
  if case == "missing label":
    label.unlink()
    return label
  if case == "size mismatch":
    Image.fromarray(np.zeros((10, 16), np.uint8)).save(label)
    return label
  if case == "label out of range":
    Image.fromarray(np.full((12, 16), 40, np.uint8)).save(label)
    return label
  if case == "zero-byte image":
    image.write_bytes(b"")
    return image
  if case == "truncated image":
    image.write_bytes(image.read_bytes()[:60])
    return image
  raise ValueError(case)


CASES = ["missing label", "size mismatch", "label out of range", "zero-byte image",
         "truncated image"]


@pytest.mark.parametrize("case", CASES)
def test_bad_example_is_a_clear_error_naming_the_file(tmp_path, case):
  root = _camvid(tmp_path)
  bad = _break(root, case)
  with pytest.raises(JaxsegError) as error:
    source = CamVid("train", data_dir=str(root))
    for i in range(len(source)):
      source[i]
  message = str(error.value)
  assert str(bad) in message and "\n" not in message, message


@pytest.mark.parametrize("case", CASES)
def test_skip_bad_examples_skips_logs_and_counts(tmp_path, case):
  root = _camvid(tmp_path / "data")
  bad = _break(root, case)
  source = CamVid("train", data_dir=str(root), skip_bad_examples=True)
  log = tmp_path / "skipped.jsonl"
  loader = pipeline.train_loader(
      source, batch_size=3, seed=0, num_epochs=1,
      operations=[pipeline.DropBadExamples(str(log)), pipeline.ValidateLabels(11)])
  batches = list(loader)
  assert sum(len(b["image"]) for b in batches) == 3  # the 3 good examples, one batch
  counted = len(source.skipped) + pipeline.count_logged(str(log))
  assert counted == 1
  reasons = source.skipped or [json.loads(line)["error"] for line in log.read_text().splitlines()]
  assert str(bad) in reasons[0]


def test_camvid_void_becomes_ignore_and_images_are_decoded_exactly(tmp_path):
  root = _camvid(tmp_path)
  source = CamVid("train", data_dir=str(root))
  example = source[2]
  raw = np.asarray(Image.open(root / "trainannot" / "f2.png"))
  np.testing.assert_array_equal(example["label"], np.where(raw == 11, 255, raw))
  np.testing.assert_array_equal(example["image"], np.asarray(Image.open(root / "train" / "f2.png")))
  assert example["name"] == "f2.png" and len(CamVid("val", data_dir=str(root))) == 4
  with pytest.raises(JaxsegError, match=r"no such directory"):
    CamVid("test", data_dir=str(root))


def test_training_skips_counts_and_evaluates_by_sliding_window(tmp_path):
  """The loop end to end on a damaged CamVid folder: a truncated train image and a missing
  val label are skipped and counted; val frames are larger than the window, so evaluation
  slides it."""
  from jaxseg.train import segmentation  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top
  root = _camvid(tmp_path / "data", n=6, size=(24, 40))  # a batch of 8 meets every one
  _break(root, "truncated image")
  (root / "valannot" / "f3.png").unlink()
  config = helpers.tiny_config(steps=1, **{
      "data.name": "camvid", "data.data_dir": str(root), "data.crop_size": (16, 16),
      "data.eval_window": (16, 24), "data.skip_bad_examples": True,
      "train.checkpoint_every": 10})
  summary = segmentation.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["skipped_examples"] == 2 and summary["eval_window"] == [16, 24]
  assert summary["eval_examples"] == 5 and summary["steps"] == 1
  log = (tmp_path / "run" / "skipped_examples.jsonl").read_text()
  assert "f1.png: corrupt or truncated image" in log
