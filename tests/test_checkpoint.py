"""Checkpoints: exact resume after SIGKILL mid-save, rerun resumes, foreign workdirs refused.

The runs read the real CamVid copy (../shared/data/camvid) with random scale/crop/flip/jitter
through two grain worker processes, so an exact resume (the resumed run reads without
workers) also proves that the data order and the augmentation draws continue where they
stopped.
"""

import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxseg.errors import JaxsegError
from jaxseg.train import segmentation
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 6
CAMVID = helpers.CAMVID
DATA = {"data.name": "camvid", "data.data_dir": str(CAMVID), "data.crop_size": (32, 32),
        "data.worker_count": 2}


def _run(workdir, *extra, env=None):
  env = {**os.environ, **(env or {})}
  overrides = [f"{k}={v}" for k, v in DATA.items()]
  return subprocess.run([sys.executable, "-m", "tests.train_tiny", str(workdir), str(STEPS),
                         *overrides, *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)


def _params(workdir, step=STEPS):
  restored = ocp.StandardCheckpointer().restore(pathlib.Path(workdir) / "checkpoints" /
                                                str(step) / "state")
  return restored


def _losses(workdir):
  rows = [json.loads(r) for r in (pathlib.Path(workdir) / "metrics.jsonl").read_text().split("\n")
          if r]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _tree_digest(path):
  digest = hashlib.sha256()
  for p in sorted(pathlib.Path(path).rglob("*")):
    digest.update(str(p.relative_to(path)).encode())
    if p.is_file():
      digest.update(p.read_bytes())
  return digest.hexdigest()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  result = _run(workdir)
  assert result.returncode == 0, result.stderr[-2000:]
  return workdir


def test_sigkill_during_async_save_then_resume_is_exact(uninterrupted, tmp_path):
  killed = _run(tmp_path, env={"TRAIN_TINY_KILL_AFTER_SAVE_STEP": "4"})
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  names = sorted(os.listdir(tmp_path / "checkpoints"))
  complete = ocp.CheckpointManager(tmp_path / "checkpoints").latest_step()
  # Killed right after the save of step 4 was issued: step 4 is either a temporary directory
  # (ignored) or, if the background write won the race, complete. Step 2 is complete.
  assert complete in (2, 4), names
  if complete == 2:
    assert any(n.startswith("4") and "tmp" in n for n in names) or "4" not in names, names

  # Whatever the race gave, also plant the leftovers of a save killed later on (a temporary
  # step directory with a higher number): it must be ignored, not restored.
  planted = tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-1234"
  (planted / "state").mkdir(parents=True)
  # Resumed without grain workers: the global batches do not depend on them
  # (pipeline.GlobalBatchSampler), so the saved position carries over.
  resumed = _run(tmp_path, "data.worker_count=0")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  summary = json.loads(resumed.stdout.strip().splitlines()[-1])
  assert summary["resumed_from"] == complete and summary["steps"] == STEPS

  a, b = _params(uninterrupted), _params(tmp_path)
  assert jax_structure(a) == jax_structure(b)
  for x, y in zip(jax_leaves(a), jax_leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)  # params, optimizer state, BN statistics, RNG, step
  # Same batches in the same order: identical losses step by step, no duplicated rows.
  assert _losses(tmp_path) == _losses(uninterrupted)


def jax_leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.leaves(tree)


def jax_structure(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.structure(tree)


def test_keeps_the_last_k_checkpoints(uninterrupted):
  steps = sorted(int(n) for n in os.listdir(uninterrupted / "checkpoints") if n.isdigit())
  assert steps == [4, 6]  # every 2 steps, train.keep_checkpoints = 2


def test_rerun_of_a_finished_run_resumes_without_training(uninterrupted):
  before = _tree_digest(uninterrupted / "checkpoints")
  again = _run(uninterrupted)
  assert again.returncode == 0, again.stderr[-2000:]
  summary = json.loads(again.stdout.strip().splitlines()[-1])
  assert summary["steps_this_run"] == 0 and summary["resumed_from"] == STEPS
  assert _tree_digest(uninterrupted / "checkpoints") == before
  steps = [json.loads(r)["step"] for r in
           (uninterrupted / "metrics.jsonl").read_text().splitlines()]
  assert steps == sorted(set(steps)) == list(range(1, STEPS + 1))  # one row per step


def test_checkpoint_of_another_model_is_refused_and_left_untouched(uninterrupted):
  before = _tree_digest(uninterrupted / "checkpoints")
  config = helpers.tiny_config(steps=STEPS, **DATA)
  config.model.aspp_features = 24  # same names, other shapes
  with pytest.raises(JaxsegError, match=r"parameter \S+ has shape .* in the checkpoint"):
    segmentation.train_and_evaluate(config, str(uninterrupted))
  config = helpers.tiny_config(steps=STEPS, **{**DATA, "optim.name": "sgd"})
  with pytest.raises(JaxsegError, match=r"written with another optimizer state"):
    segmentation.train_and_evaluate(config, str(uninterrupted))
  config = helpers.tiny_config(steps=STEPS, **{**DATA, "data.num_train_examples": 50})
  with pytest.raises(JaxsegError, match=r"written with another training data"):
    segmentation.train_and_evaluate(config, str(uninterrupted))
  config = helpers.tiny_config(steps=STEPS, **DATA)
  config.model.backbone = "resnet50"
  with pytest.raises(JaxsegError, match=r"holds a checkpoint of deeplabv3plus/tiny_resnet with 11 "
                                        r"classes \(step 6\), but this run builds "
                                        r"deeplabv3plus/resnet50"):
    segmentation.train_and_evaluate(config, str(uninterrupted))
  assert _tree_digest(uninterrupted / "checkpoints") == before
