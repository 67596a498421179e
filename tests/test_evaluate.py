"""jaxseg.evaluate and `python -m experiments.evaluate` / `experiments.predict`: a restored run
reproduces its training-time scores, ensembles and TTA are evaluated like a run, and the
outputs (eval.json, pictures, label PNGs) hold what they claim."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxseg import evaluate, visualize
from jaxseg.data import SyntheticShapes
from jaxseg.errors import JaxsegError
from jaxseg.inference import TTA
from jaxseg import runs
from jaxseg.train import segmentation
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  summary = segmentation.train_and_evaluate(helpers.tiny_config(steps=2), str(workdir))
  return str(workdir), summary


def test_a_restored_run_reproduces_its_training_evaluation(tiny_run, tmp_path):
  workdir, summary = tiny_run
  result, report = evaluate.run_evaluation([workdir], out_dir=str(tmp_path), num_examples=8)
  assert report["miou"] == summary["miou"]
  assert report["pixel_accuracy"] == summary["pixel_accuracy"]
  assert [c["iou"] for c in report["per_class"].values()] == summary["per_class_iou"]
  assert report["examples"] == 8 and report["tta"] == "none" and report["step"] == 2
  confusion = np.asarray(report["confusion"])
  assert confusion.sum() == report["num_pixels"] == 8 * 32 * 32
  np.testing.assert_array_equal(confusion, result.confusion)
  for picture in ("confusion.png", "eval_predictions.png"):
    assert (tmp_path / picture).read_bytes()[:4] == b"\x89PNG"
  # An ensemble of one run is that run.
  _, alone = evaluate.run_evaluation([workdir], weights=[2.0], out_dir=str(tmp_path / "e"),
                                     num_examples=8)
  assert alone["miou"] == summary["miou"] and alone["members"][0]["weight"] == 1.0


def test_tta_and_windows_are_recorded_and_change_the_scores(tiny_run, tmp_path):
  workdir, summary = tiny_run
  _, report = evaluate.run_evaluation([workdir], out_dir=str(tmp_path), num_examples=8,
                                      tta=TTA((0.75, 1.0, 1.5), flip=True), window=(16, 16))
  assert report["tta"] == "scales 0.75, 1, 1.5 + flip" and report["window"] == [16, 16]
  assert report["scales"] == [0.75, 1.0, 1.5] and report["flip"] is True
  assert 0 <= report["miou"] <= 1 and report["miou"] != summary["miou"]
  stored = json.loads((tmp_path / "eval.json").read_text())
  assert stored["tta"] == report["tta"] and stored["miou"] == report["miou"]


def test_another_dataset_must_have_the_run_s_classes(tiny_run):
  workdir, _ = tiny_run
  with pytest.raises(JaxsegError, match=r"CamVid.*has classes \(sky, building, pole, road, "
                                        r"\.\.\.; 11\) but the model predicts \(background"):
    evaluate.run_evaluation([workdir], dataset="camvid", data_dir=helpers.CAMVID,
                            num_examples=2)


@pytest.mark.parametrize("value, expected", [("512x1024", (512, 1024)), ("0", None),
                                             ("", "default"), ("whole", None)])
def test_parse_window(value, expected):
  assert evaluate.parse_window(value) == expected


def test_overlay_blends_the_palette_and_leaves_ignored_pixels_alone():
  image = np.full((2, 3, 3), 100, np.uint8)
  labels = np.array([[0, 1, 255], [1, 0, 255]], np.uint8)
  palette = np.array([[200, 0, 0], [0, 200, 0]], np.uint8)
  out = visualize.overlay(image, labels, palette, alpha=0.5)
  np.testing.assert_array_equal(out[0, 0], [150, 50, 50])
  np.testing.assert_array_equal(out[0, 1], [50, 150, 50])
  np.testing.assert_array_equal(out[:, 2], image[:, 2])


def _cli(module, *args):
  return subprocess.run([sys.executable, "-m", f"experiments.{module}", *args], cwd=ROOT,
                        env=helpers.device_env(1), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory):
  """A registered model (a subprocess cannot see the tests' tiny backbone)."""
  workdir = tmp_path_factory.mktemp("unet")
  result = _cli("unet", "--variant=unet", f"--workdir={workdir}", "--config.model.features=4",
                "--config.model.depth=2", "--config.data.image_size=32",
                "--config.train.steps=2", "--config.train.num_eval_examples=8",
                "--config.train.num_prediction_images=0")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_evaluate_command_writes_eval_json_and_ensembles_need_an_output(unet_run, tmp_path):
  result = _cli("evaluate", f"--workdir={unet_run},{unet_run}", "--weights=1,3",
                f"--out={tmp_path}", "--num_examples=8", "--scales=1,1.25", "--flip")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / "eval.json").read_text())
  assert report["tta"] == "scales 1, 1.25 + flip" and report["examples"] == 8
  assert [m["weight"] for m in report["members"]] == [0.25, 0.75]
  assert "IoU" in result.stdout and (tmp_path / "confusion.png").exists()
  missing = _cli("evaluate", f"--workdir={unet_run},{unet_run}")
  assert missing.stderr.strip().splitlines()[-1] == (
      "error: --out: an ensemble of several runs needs an output directory")
  nowhere = _cli("evaluate", f"--workdir={tmp_path / 'nowhere'}")
  assert nowhere.stderr.strip().splitlines()[-1] == (
      f"error: --workdir={tmp_path / 'nowhere'}: no config.json there (is it the workdir of a "
      "segmentation run?)")


def test_predict_writes_labels_masks_and_overlays(unet_run, tmp_path):
  images = [SyntheticShapes("val", image_size=40, num_examples=2)[i]["image"] for i in range(2)]
  paths = [tmp_path / "a.png", tmp_path / "b.jpg"]
  for image, path in zip(images, paths):
    Image.fromarray(image).save(path, quality=95)
  result = _cli("predict", f"--workdir={unet_run}", *map(str, paths))
  assert result.returncode == 0, result.stderr[-3000:]
  run = runs.load_run(str(unet_run))
  for path in paths:
    stem = tmp_path / path.stem
    labels = np.asarray(Image.open(f"{stem}_labels.png"))
    assert labels.shape == (40, 40) and labels.max() < run.num_classes
    expected = np.argmax(run.probabilities(np.asarray(Image.open(path).convert("RGB"))[None])[0],
                         -1)
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(np.asarray(Image.open(f"{stem}_mask.png")),
                                  run.classes.palette[labels])
    assert np.asarray(Image.open(f"{stem}_overlay.png")).shape == (40, 40, 3)
  bad = tmp_path / "broken.png"
  bad.write_bytes(b"not an image")
  result = _cli("predict", f"--workdir={unet_run}", str(bad))
  assert result.stderr.strip().splitlines()[-1].startswith(f"error: {bad}: not a readable image")


def test_the_batch_must_split_over_the_devices(tiny_run):
  workdir, _ = tiny_run
  run = runs.load_run(workdir)
  source = SyntheticShapes("val", image_size=32, num_examples=4)
  with pytest.raises(JaxsegError, match=r"--batch_size=3 is not a positive multiple of the 8 "
                                        r"devices of the mesh \(e.g. 8\)"):
    evaluate.evaluate(run, source, batch_size=3)


def test_docs_evaluation_example_runs(unet_run, tmp_path):
  """docs/evaluation.md's library snippet, on this test's run instead of the runs it names."""
  import re  # pylint: disable=g-import-not-at-top
  page = (ROOT / "docs" / "evaluation.md").read_text()
  code = next(b for b in re.findall(r"```python\n(.+?)```", page, re.S) if "Ensemble" in b)
  for name in ("runs/deeplab_resnet101_synthetic", "runs/unet_attention_synthetic"):
    assert name in code
    code = code.replace(name, str(unet_run))
  code = code.replace("runs/my_ensemble", str(tmp_path / "ensemble"))
  code = code.replace("window=(512, 1024)", "window=(16, 16)")
  images = np.zeros((2, 32, 32, 3), np.uint8)
  exec(compile(code, "README.md", "exec"), {"images_uint8": images})  # pylint: disable=exec-used
  report = json.loads((tmp_path / "ensemble" / "eval.json").read_text())
  assert report["tta"] == "scales 0.5, 0.75, 1, 1.25, 1.5, 1.75 + flip"
  assert len(report["members"]) == 2
