"""`python -m experiments.deeplab` end to end (2 steps), its outputs, and its one-line errors."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers

from jaxseg import backbones, weights
from jaxseg.weights import store

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _deeplab(*args, devices=2, timeout=600):
  env = helpers.device_env(devices)
  return subprocess.run([sys.executable, "-m", "experiments.deeplab", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _pretrained_resnet50(directory):
  """A converted-checkpoint stand-in: Keras-style ResNet-50 variables + Keras metadata."""
  module = backbones.ResNet50(style="keras")
  variables = jax.jit(module.init, static_argnames="train")(
      jax.random.key(3), jnp.zeros((1, 32, 32, 3)), train=False)
  store.save_pretrained(str(directory), jax.tree.map(np.asarray, variables), {
      "source": "keras", "arch": "resnet50", "backbone": "resnet50",
      "backbone_kwargs": {"style": "keras"}, "preprocessing": weights.PREPROCESSING["caffe"],
      "preprocessing_name": "caffe", "input_file": "x.h5", "input_sha256": "0" * 64})


def test_two_steps_end_to_end_writes_every_output(tmp_path):
  workdir = tmp_path / "run"
  _pretrained_resnet50(tmp_path / "pretrained")
  result = _deeplab("--backbone=resnet50", f"--workdir={workdir}", "--config.data.image_size=32",
                    "--config.train.steps=2", "--config.train.batch_size=2",
                    "--config.train.log_every=1", "--config.train.num_eval_examples=4",
                    "--config.train.num_prediction_images=2",
                    f"--config.model.pretrained={tmp_path / 'pretrained'}",
                    "--config.optim.freeze_backbone_steps=1")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Backbone from {tmp_path / 'pretrained'}: keras resnet50 weights (caffe" in (
      result.stderr)
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["pretrained"] == "keras:resnet50"
  for key in ("miou", "pixel_accuracy", "mean_dice", "per_class_iou", "steps", "train_seconds",
              "images_per_second", "backbone", "dataset", "num_params"):
    assert key in summary, key
  assert summary["steps"] == 2 and summary["backbone"] == "resnet50"
  assert summary["dataset"] == "synthetic" and summary["devices"] == 2
  assert len(summary["per_class_iou"]) == 5 and 0.0 <= summary["pixel_accuracy"] <= 1.0
  rows = [json.loads(r) for r in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2]
  assert all({"loss", "learning_rate"} <= r.keys() for r in rows)
  assert "eval/miou" in rows[-1]
  assert (workdir / "predictions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert any(p.name.startswith("events.out.tfevents") for p in (workdir / "tensorboard").iterdir())
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
  assert "train:" in result.stderr  # the progress bar
  assert json.loads(result.stdout.splitlines()[0])["steps"] == 2


@pytest.mark.parametrize("args, message", [
    (["--backbone=resnet18"], "error: unknown --backbone='resnet18'; valid choices: resnet101, "
                              "resnet50, xception"),
    (["--dataset=imagenet"], "error: unknown --dataset='imagenet'; valid choices: ade20k, "
                             "camvid, cityscapes, coco, folder, synthetic, voc"),
    (["--dataset=camvid"], "error: dataset camvid is read from disk: pass --data_dir=PATH"),
    (["--dataset=cityscapes", "--data_dir=/nowhere"],
     "error: /nowhere/leftImg8bit/train: no such directory (Cityscapes train images)"),
    (["--dataset=camvid", f"--data_dir={helpers.CAMVID}", "--config.data.options.classes=voc"],
     "error: --config.data.options.classes: dataset camvid takes no options"),
    (["--dataset=camvid", f"--data_dir={helpers.CAMVID}", "--config.data.crop_size=(1,2,3)"],
     "error: --config.data.crop_size=(1, 2, 3) must be two numbers"),
    (["--config.train.stepz=3"], "error: unknown config key --config.train.stepz; valid keys "
                                 "under train: accumulate_steps, batch_size,"),
    (["--config.model.dtype=float16"], "error: --config.model.dtype='float16' is not one of: "
                                       "auto, float32, bfloat16"),
    (["--config.train.batch_size=3"], "error: --config.train.batch_size=3 is not divisible by "
                                      "the 2 devices"),
    (["--config.train.checkpoint_every=0"], "error: --config.train.checkpoint_every=0 must be a "
                                            "whole number >= 1"),
    (["--config.model.output_stride=4", "--backbone=resnet50", "--config.data.image_size=32"],
     "error: --config.model.output_stride=4 is not one of: 8, 16, 32"),
    (["--config.optim.name=adam"], "error: --config.optim.name='adam' is not one of: sgd, adamw"),
    (["--config.optim.learning_rate=nan"],
     "error: --config.optim.learning_rate=nan must be a finite number > 0"),
    (["--config.data.preset=easy"], "error: unknown preset 'easy'; valid presets: default, hard"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
  result = _deeplab(*args, f"--workdir={tmp_path}")
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(message), result.stderr[-2000:]
  assert "Traceback" not in result.stderr
