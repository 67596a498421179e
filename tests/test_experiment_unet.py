"""`python -m experiments.unet` end to end (2 steps, narrow widths, on the real CamVid copy)
and its one-line errors."""

import json
import pathlib
import subprocess
import sys

import pytest

from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _unet(*args, timeout=600):
  env = helpers.device_env(2)
  return subprocess.run([sys.executable, "-m", "experiments.unet", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_attention_variant_end_to_end_writes_attention_figure(tmp_path):
  workdir = tmp_path / "run"
  result = _unet("--variant=attention", f"--workdir={workdir}", "--dataset=camvid",
                 f"--data_dir={helpers.CAMVID}", "--config.data.crop_size=32",
                 "--config.model.features=8", "--config.model.depth=3",
                 "--config.train.steps=2", "--config.train.batch_size=2",
                 "--config.train.num_eval_examples=4", "--config.train.num_prediction_images=2")
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["model"] == "attention_unet" and summary["steps"] == 2
  assert summary["backbone"] is None and summary["devices"] == 2
  # Trained on 32x32 crops, evaluated on whole 360x480 val frames.
  assert summary["dataset"] == "camvid" and summary["eval_examples"] == 4
  assert len(summary["per_class_iou"]) == 11 and summary["skipped_examples"] == 0
  for picture in ("predictions.png", "attention.png"):
    assert (workdir / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "attention.png" in result.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("args, message", [
    (["--variant=vnet"], "error: unknown --variant='vnet'; valid choices: attention, resnet50, "
                         "unet"),
    (["--variant=resnet50", "--config.model.depth=3"],
     "error: --config.model.depth does not apply to model resnet50_unet"),
    (["--variant=unet", "--config.model.pretrained=/nowhere"],
     "error: --config.model.pretrained=/nowhere: model unet has no backbone to load it into"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
  result = _unet(*args, f"--workdir={tmp_path}")
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == message, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
