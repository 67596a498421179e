"""The shared training skeleton's reliability contract (jaxseg.train.loop, workdir, build).

Each test reproduces a case of the fault probe of issue 20 on the tiny DeepLab of the tests.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import optax
import pytest

from jaxseg import evaluate, predict
from jaxseg.errors import JaxsegError
from jaxseg.train import build, distributed, segmentation
from jaxseg.train.logging import MetricWriter
from jaxseg.train.workdir import Lock
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _rows(workdir):
  return [json.loads(r) for r in (pathlib.Path(workdir) / "metrics.jsonl").read_text().split("\n")
          if r]


def _keys_by_step(rows):
  """{step: sorted keys}, failing on any key written twice for one step."""
  seen = {}
  for row in rows:
    keys = seen.setdefault(row["step"], [])
    duplicated = set(keys) & (set(row) - {"step"})
    assert not duplicated, f"step {row['step']}: {sorted(duplicated)} written twice"
    keys.extend(k for k in row if k != "step")
  return {step: sorted(keys) for step, keys in seen.items()}


# --- the workdir lock ---------------------------------------------------------------------------


def test_a_second_run_on_a_locked_workdir_is_refused_naming_the_holder(tmp_path):
  with Lock(str(tmp_path), "segmentation training"):
    with pytest.raises(JaxsegError, match=rf"in use by another jaxseg segmentation training "
                                          rf"\(PID {os.getpid()} on host \S+\)"):
      segmentation.train_and_evaluate(helpers.tiny_config(steps=2), str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()  # refused before anything was written


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from jaxseg.train.workdir import Lock; "
       f"Lock({str(tmp_path)!r}, 'run').acquire(); print('held', flush=True); time.sleep(600)"],
      cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(JaxsegError, match=rf"PID {holder.pid}"):
      Lock(str(tmp_path), "run").acquire()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  Lock(str(tmp_path), "run").acquire().release()  # the kernel dropped it with the process


def test_evaluate_and_predict_into_a_locked_run_are_refused(tmp_path):
  image = tmp_path / "images" / "a.png"
  image.parent.mkdir()
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
  (tmp_path / "run").mkdir()
  with Lock(str(tmp_path / "run"), "segmentation training"):
    with pytest.raises(JaxsegError, match="in use by another jaxseg"):
      evaluate.run_evaluation([str(tmp_path / "run")])
    with pytest.raises(JaxsegError, match="in use by another jaxseg"):
      predict.export_predictions(None, [str(image)], out_dir=str(tmp_path / "run"))


@pytest.mark.parametrize("kind", ["file", "under_a_file"])
def test_a_workdir_that_cannot_be_a_directory_is_one_line(tmp_path, kind):
  (tmp_path / "f").write_text("x")
  workdir = tmp_path / "f" if kind == "file" else tmp_path / "f" / "run"
  t = time.perf_counter()
  with pytest.raises(JaxsegError, match=r"--workdir=\S+ (is a file|is not writable)"):
    segmentation.train_and_evaluate(helpers.tiny_config(steps=2), str(workdir))
  assert time.perf_counter() - t < 5  # before anything compiles


# --- metrics.jsonl ------------------------------------------------------------------------------


def test_metric_writer_adds_what_a_killed_run_had_not_written_and_nothing_twice(tmp_path):
  writer = MetricWriter(str(tmp_path))
  writer.write(1, {"loss": 1.0})
  writer.write(2, {"loss": 0.5})  # killed before step 2's evaluation row
  writer.write(3, {"loss": 0.4})  # after the checkpoint of step 2
  writer.close()
  resumed = MetricWriter(str(tmp_path), resume_step=2)
  assert resumed.logged(2) == {"step", "loss"}
  resumed.write(2, {"loss": 0.5, "eval/miou": 0.3})
  resumed.write(2, {"eval/miou": 0.3})
  resumed.close()
  assert _rows(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5},
                             {"step": 2, "eval/miou": 0.3}]


CONFIG = dict(steps=4, **{"train.eval_every": 2})  # checkpoints and evaluations at 2 and 4


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
  """(workdir, summary) of one uninterrupted run that several tests compare against or copy."""
  workdir = tmp_path_factory.mktemp("whole")
  return workdir, segmentation.train_and_evaluate(helpers.tiny_config(**CONFIG), str(workdir))


def _copy(whole, tmp_path):
  shutil.copytree(whole[0], tmp_path / "run")
  os.remove(tmp_path / "run" / ".lock")
  return tmp_path / "run"


def test_a_run_stopped_between_checkpoint_and_evaluation_writes_every_row_once(whole, tmp_path,
                                                                               monkeypatch):
  config = helpers.tiny_config(**CONFIG)
  # Stopped at step 2, an evaluation step: its checkpoint is written, its evaluation is not.
  helpers.sigterm_at_step(monkeypatch, 2)
  with pytest.raises(distributed.Preempted):
    segmentation.train_and_evaluate(config, str(tmp_path / "split"))
  assert "eval/miou" not in _keys_by_step(_rows(tmp_path / "split"))[2]
  monkeypatch.undo()
  resumed = segmentation.train_and_evaluate(config, str(tmp_path / "split"))
  assert resumed["resumed_from"] == 2 and resumed["miou"] == whole[1]["miou"]
  assert _keys_by_step(_rows(tmp_path / "split")) == _keys_by_step(_rows(whole[0]))
  split = {(r["step"], k): v for r in _rows(tmp_path / "split") for k, v in r.items()}
  for row in _rows(whole[0]):
    for key, value in row.items():
      assert split[row["step"], key] == pytest.approx(value, rel=1e-5), (row["step"], key)


# --- resume with other settings -----------------------------------------------------------------


def test_resume_refuses_a_changed_optimizer_setting_and_records_harmless_changes(whole,
                                                                                 tmp_path):
  workdir = str(_copy(whole, tmp_path))
  before = (tmp_path / "run" / "config.json").read_text()
  changed = helpers.tiny_config(**{**CONFIG, "steps": 5, "optim.learning_rate": 0.01})
  with pytest.raises(JaxsegError, match=r"--config.optim.learning_rate=0.01: .* \(step 4\) was "
                                        r"trained with 0.002; resume with the same value"):
    segmentation.train_and_evaluate(changed, workdir)
  seed = helpers.tiny_config(**{**CONFIG, "steps": 5, "train.seed": 1})
  with pytest.raises(JaxsegError, match=r"--config.train.seed=1: "):
    segmentation.train_and_evaluate(seed, workdir)
  assert (tmp_path / "run" / "config.json").read_text() == before  # left untouched
  summary = segmentation.train_and_evaluate(helpers.tiny_config(**{**CONFIG, "steps": 5}),
                                            workdir)
  assert summary["resumed_from"] == 4 and summary["steps"] == 5
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["optim"]["learning_rate"] == 0.002 and saved["train"]["steps"] == 5
  assert saved["changes"] == [{"step": 4, "train.steps": [4, 5]}]


def test_a_rerun_that_only_adds_skip_bad_examples_resumes(tmp_path, monkeypatch):
  overrides = {"data.name": "camvid", "data.data_dir": str(helpers.CAMVID),
               "data.crop_size": (32, 32), "train.checkpoint_every": 1}
  config = helpers.tiny_config(steps=2, **overrides)
  helpers.sigterm_at_step(monkeypatch, 1)
  with pytest.raises(distributed.Preempted):
    segmentation.train_and_evaluate(config, str(tmp_path))
  monkeypatch.undo()
  again = helpers.tiny_config(steps=2, **overrides)
  again.data.skip_bad_examples = True
  assert segmentation.train_and_evaluate(again, str(tmp_path))["resumed_from"] == 1


def test_a_bad_val_label_stops_the_run_before_it_trains(tmp_path):
  data = tmp_path / "camvid"
  for split in ("train", "val"):
    for folder in (split, split + "annot"):
      (data / folder).mkdir(parents=True)
      for name in sorted(os.listdir(helpers.CAMVID / folder))[:8]:
        (data / folder / name).symlink_to(helpers.CAMVID / folder / name)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  bad = sorted((data / "valannot").iterdir())[3]
  label = np.asarray(Image.open(bad)).copy()
  label[:4, :4] = 40  # CamVid has 11 classes (and void 11)
  bad.unlink()
  Image.fromarray(label).save(bad)
  config = helpers.tiny_config(steps=2, **{"data.name": "camvid", "data.data_dir": str(data),
                                           "data.crop_size": (32, 32)})
  with pytest.raises(JaxsegError, match=rf"{bad.name}: label values \[40\]"):
    segmentation.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()


# --- validation before anything is built --------------------------------------------------------


@pytest.mark.parametrize("key, value, message", [
    ("optim.learning_rate", float("nan"), r"--config.optim.learning_rate=nan must be a finite "
                                          r"number > 0"),
    ("optim.learning_rate", float("inf"), r"learning_rate=inf must be"),
    ("optim.learning_rate", -0.1, r"learning_rate=-0.1 must be"),
    ("optim.warmup_steps", -1, r"--config.optim.warmup_steps=-1 must be a whole number >= 0"),
    ("train.num_eval_examples", -1, r"--config.train.num_eval_examples=-1 must be"),
    ("train.batch_size", 0, r"--config.train.batch_size=0 must be a whole number >= 1"),
    ("optim.name", "adam", r"--config.optim.name='adam' is not one of: sgd, adamw"),
    ("model.output_stride", 12, r"--config.model.output_stride=12 is not one of: 8, 16, 32"),
    ("optim.b2", 1.0, r"--config.optim.b2=1.0 must be a finite number in \[0, 1\)"),
])
def test_bad_config_values_are_one_line_naming_the_key(key, value, message):
  config = helpers.tiny_config(steps=2)
  section, name = key.split(".")
  setattr(config[section], name, value)
  with pytest.raises(JaxsegError, match=message):
    build.validate(config)


def _training_configs():
  """Every config that a training loop validates: the experiments' own, and the stages of
  the GAN-augmentation study (compare's are the experiments' configs again)."""
  from experiments.configs import (deeplab, gan_augment, sagan,  # pylint: disable=g-import-not-at-top
                                   superpixel_gnn, unet)
  study = gan_augment.get_config()
  return {"deeplab": deeplab.get_config(), "unet": unet.get_config(),
          "superpixel_gnn": superpixel_gnn.get_config(), "sagan": sagan.get_config(),
          "gan_augment.gan": study.gan, "gan_augment.segmentation": study.segmentation}


@pytest.mark.parametrize("name", sorted(_training_configs()))
def test_every_numeric_config_key_has_a_rule_and_the_defaults_pass(name):
  config = _training_configs()[name]
  for key, value in build._flat(config).items():  # pylint: disable=protected-access
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      assert key in build.RULES or key in build.CHOICES, f"{name}: --config.{key} has no rule"
  build.validate(config)


# --- the non-finite policy covers the update ----------------------------------------------------


def test_a_nan_learning_rate_cannot_reach_the_parameters(tmp_path):
  config = helpers.tiny_config(steps=3, **{"train.checkpoint_every": 100})
  config.train.max_nonfinite_steps = 3
  # Past validation (as a schedule could produce it): the loss and gradients are finite,
  # the update is not.
  real = build.optimizer

  def nan_schedule(config, steps=None):
    del config, steps
    return (lambda count: count * np.nan), optax.sgd(lambda count: count * 0 + np.nan)

  build.optimizer = nan_schedule
  try:
    with pytest.raises(FloatingPointError, match=r"3 consecutive steps with a non-finite loss, "
                                                 r"gradient or update"):
      segmentation.train_and_evaluate(config, str(tmp_path))
  finally:
    build.optimizer = real
  assert sum(r.get("nonfinite_step", 0) for r in _rows(tmp_path)) == 3


# --- Ctrl-C -------------------------------------------------------------------------------------


def test_ctrl_c_saves_at_the_current_step_and_exits_130(tmp_path):
  env = helpers.device_env(1)
  argv, env = helpers.paused_at("experiments.unet", 2, tmp_path / "paused", env)
  command = [*argv, "--variant=unet", "--config.model.features=4", "--config.model.depth=2",
             "--config.data.image_size=32", "--config.train.steps=6",
             "--config.train.checkpoint_every=100", f"--workdir={tmp_path / 'run'}"]
  with helpers.processes_in_sessions([(command, env)]) as started:
    deadline = time.monotonic() + 300
    while not (tmp_path / "paused").exists():
      assert started[0].poll() is None, helpers.finish(started)[0][2][-3000:]
      assert time.monotonic() < deadline
      time.sleep(0.1)
    started[0].send_signal(signal.SIGINT)
    code, out, err = helpers.finish(started)[0]
  assert code == 130, err[-2000:]
  assert "interrupted: saved step 2" in out and "Traceback" not in err
  assert (tmp_path / "run" / "checkpoints" / "2").is_dir()


# --- checkpoints: a damaged newest one, a full disk ----------------------------------------------


def test_a_damaged_newest_checkpoint_resumes_from_the_intact_one_exactly(whole, tmp_path,
                                                                          caplog, capfd):
  workdir = _copy(whole, tmp_path)
  data = max((workdir / "checkpoints" / "4" / "state").rglob("*"),
             key=lambda p: p.stat().st_size if p.is_file() else -1)
  data.write_bytes(data.read_bytes()[:16])  # truncated
  capfd.readouterr()
  caplog.clear()
  again = segmentation.train_and_evaluate(helpers.tiny_config(**CONFIG), str(workdir))
  warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"
            and "is damaged" in r.getMessage()]
  assert len(warned) == 1 and "checkpoint 4 in" in warned[0] and "(state:" in warned[0]
  assert "resuming from step 2" in warned[0] and "\n" not in warned[0]
  assert not [r for r in caplog.records if r.levelname == "ERROR"]
  assert "Traceback" not in capfd.readouterr().err
  assert again["resumed_from"] == 2 and again["miou"] == whole[1]["miou"]


@pytest.fixture
def small_disk(tmp_path):
  """A 32 MB tmpfs: a few of the tiny model's checkpoints fit."""
  with helpers.tmpfs(tmp_path / "disk", "32m") as mount_point:
    yield mount_point


def test_a_full_disk_stops_the_run_at_that_checkpoint_in_one_line(small_disk, monkeypatch):
  from jaxseg.train import checkpoint  # pylint: disable=g-import-not-at-top
  save = checkpoint.Checkpointer.save

  def fill_after_step_2(self, step, *args, **kwargs):
    saved = save(self, step, *args, **kwargs)
    if step == 2:  # the disk fills up while step 3 trains
      self.wait()
      with open(small_disk / "filler", "wb") as f:
        with pytest.raises(OSError):
          while True:
            f.write(b"\0" * (64 << 10))
            f.flush()
    return saved

  monkeypatch.setattr(checkpoint.Checkpointer, "save", fill_after_step_2)
  config = helpers.tiny_config(steps=6, **{"train.log_every": 100})
  workdir = small_disk / "run"
  with pytest.raises(JaxsegError, match=rf"^no space left on {workdir}/checkpoints: checkpoint 4 "
                                        r"not written; the last good checkpoint is 2 "):
    segmentation.train_and_evaluate(config, str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
  assert not [p for p in workdir.rglob("*") if "tmp" in p.name]


def test_evaluate_on_a_read_only_run_stops_before_computing(whole, small_disk):
  shutil.copytree(whole[0], small_disk / "run", ignore=shutil.ignore_patterns(".lock"))
  subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
  t = time.perf_counter()
  with pytest.raises(JaxsegError, match=rf"--workdir={small_disk / 'run'} is not writable: "
                                        r"read-only file system"):
    evaluate.run_evaluation([str(small_disk / "run")])
  assert time.perf_counter() - t < 2  # nothing was loaded or computed
  # So does resuming its training (the probe's: a raw traceback after 15 s).
  with pytest.raises(JaxsegError, match=r"--workdir=\S+ is not writable"):
    segmentation.train_and_evaluate(helpers.tiny_config(**CONFIG), str(small_disk / "run"))
