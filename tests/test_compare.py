"""`python -m experiments.compare` on a tiny budget end to end, its resumption, and the budget
and model selection rules (jaxseg.studies.compare)."""

import json
import pathlib
import subprocess
import sys

import pytest

from experiments.configs import compare as compare_config
from jaxseg.errors import JaxsegError
from jaxseg.studies import compare
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Two steps of two narrow models on 32x32 images: the whole pipeline in about a minute.
TINY = ["--budget=2", "--config.data.image_size=32", "--config.data.num_train_examples=16",
        "--config.train.num_eval_examples=8", "--config.train.checkpoint_every=1",
        "--config.train.num_prediction_images=0", "--config.profile.batch_size=2",
        "--config.profile.repeats=1",
        "--config.models.unet.model.features=4", "--config.models.unet.model.depth=2",
        "--config.models.superpixel_gnn.superpixels.n_segments=24",
        "--config.models.superpixel_gnn.model.hidden=8",
        "--config.models.superpixel_gnn.model.num_layers=1"]


@pytest.mark.parametrize("budget, steps", [("300", 300), ("2epochs", 250), ("0.5 epochs", 63),
                                           ("1ep", 125)])
def test_budget_is_steps_or_epochs(budget, steps):
  assert compare.parse_budget(budget, epoch_images=1000, batch_size=8) == steps


@pytest.mark.parametrize("budget", ["abc", "1.5", "0", "-3"])
def test_bad_budget_is_refused(budget):
  with pytest.raises(JaxsegError, match="--budget="):
    compare.parse_budget(budget, epoch_images=1000, batch_size=8)


def test_every_model_shares_the_data_and_budget_but_keeps_its_own_recipe():
  config = compare.configure(compare_config.get_config(), budget="40")
  assert compare.selected(config) == ["unet", "attention_unet", "resnet50_unet",
                                      "deeplab_xception", "deeplab_resnet101", "superpixel_gnn"]
  gnn = compare.model_config(config, "superpixel_gnn")
  deeplab = compare.model_config(config, "deeplab_resnet101")
  for cfg in (gnn, deeplab):
    assert cfg.train.steps == 40 and cfg.train.batch_size == 8
    assert cfg.data.num_train_examples == 1000  # the synthetic preset
  assert deeplab.model.backbone == "resnet101"
  assert compare.model_config(config, "deeplab_xception").model.backbone == "xception65"
  assert gnn.optim.learning_rate == 3e-3 and deeplab.optim.learning_rate == 2e-3
  with pytest.raises(JaxsegError, match="unknown vgg; valid choices: "):
    compare.configure(compare_config.get_config(), models=["unet", "vgg"])


def _compare(workdir, *args):
  return subprocess.run([sys.executable, "-m", "experiments.compare", f"--workdir={workdir}",
                         *TINY, *args], cwd=ROOT, env=helpers.device_env(1),
                        capture_output=True, text=True, timeout=900)


def test_compare_end_to_end_and_resumes_without_retraining(tmp_path):
  # An interrupted comparison: only the first model was trained.
  first = _compare(tmp_path, "--models=unet")
  assert first.returncode == 0, first.stderr[-3000:]
  trained = (tmp_path / "unet" / "summary.json").stat().st_mtime_ns
  result = _compare(tmp_path, "--models=unet,superpixel_gnn")
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / "unet" / "summary.json").stat().st_mtime_ns == trained  # not retrained

  table = json.loads((tmp_path / "compare.json").read_text())
  rows = {r["name"]: r for r in table["rows"]}
  assert list(rows) == ["unet", "superpixel_gnn", "ensemble"]
  assert table["budget_steps"] == 2 and table["val_examples"] == 8
  for name in ("unet", "superpixel_gnn"):
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    assert summary["steps"] == 2
    assert rows[name]["miou"] == summary["miou"] and rows[name]["params"] == summary["num_params"]
    for key in ("epoch_seconds", "gflops_per_image", "images_per_second", "peak_bytes"):
      assert rows[name][key] > 0, (name, key)
    # time / epoch: the 16 training images at the measured training speed.
    assert rows[name]["epoch_seconds"] == pytest.approx(16 / summary["images_per_second"])
  # The default ensemble is every CNN row: here the U-Net alone, which it must equal.
  assert rows["ensemble"]["model"] == "unet"
  assert rows["ensemble"]["miou"] == rows["unet"]["miou"]
  assert rows["ensemble"]["pixel_accuracy"] == rows["unet"]["pixel_accuracy"]
  markdown = (tmp_path / "compare.md").read_text()
  assert "| model | pixel acc. | mIoU | mean Dice | time / epoch | params | GFLOPs / image " \
         "| images/s | peak memory |" in markdown
  assert "| superpixel_gnn |" in markdown and "## Per-class val IoU" in markdown
  for picture in ("compare.png", "per_class_iou.png", "ensemble/confusion.png"):
    assert (tmp_path / picture).read_bytes()[:4] == b"\x89PNG"

  # Everything finished: a third call trains and measures nothing and writes the same table.
  profile = (tmp_path / "superpixel_gnn" / "profile.json").stat().st_mtime_ns
  again = _compare(tmp_path, "--models=unet,superpixel_gnn")
  assert again.returncode == 0, again.stderr[-3000:]
  assert (tmp_path / "superpixel_gnn" / "profile.json").stat().st_mtime_ns == profile
  assert json.loads((tmp_path / "compare.json").read_text())["rows"] == table["rows"]

  # Other data in the same workdir: refused in one line, the finished run left as it was.
  changed = _compare(tmp_path, "--models=unet", "--config.data.seed=1")
  assert changed.stderr.strip().splitlines()[-1].startswith(
      f"error: {tmp_path / 'unet' / 'checkpoints'} (step 2) was written with another training "
      "data (data.* settings)"), changed.stderr[-2000:]
  assert (tmp_path / "unet" / "summary.json").stat().st_mtime_ns == trained
  assert json.loads((tmp_path / "unet" / "config.json").read_text())["data"]["seed"] == 0


def test_a_run_trained_past_the_budget_is_refused(tmp_path):
  (tmp_path / "unet").mkdir()
  (tmp_path / "unet" / "summary.json").write_text(json.dumps({"steps": 5}))
  result = _compare(tmp_path, "--models=unet")
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: {tmp_path / 'unet'} was trained for 5 steps, more than the budget of 2; use "
      "another --workdir or --budget")

