"""Tiny models and configs shared by the tests (batch 2-8, 32-64 px, narrow widths)."""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import re
import signal
import subprocess
import sys
import shutil
import time

import pytest

from experiments.configs import deeplab as deeplab_config
from jaxseg import backbones
from jaxseg.backbones.resnet import ResNet
from jaxseg.train import distributed

# The real CamVid copy beside the repository (CI clones next to ../shared).
CAMVID = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"

# A narrow, shallow ResNet with the real block structure and parameter naming.
TINY_RESNET = functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), width=8)


def device_env(devices: int) -> dict[str, str]:
  """The environment of a subprocess with `devices` fake CPU devices; the rest of the
  session's XLA flags (conftest.py) are kept."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", ""))
  return dict(os.environ,
              XLA_FLAGS=f"{flags.strip()} --xla_force_host_platform_device_count={devices}")


def register_tiny_backbone(name: str = "tiny_resnet") -> str:
  """Makes the tiny ResNet selectable by name (what a subprocess test needs)."""
  backbones.BACKBONES.setdefault(name, TINY_RESNET)
  return name


def tiny_config(steps: int = 4, **overrides):
  """The DeepLab experiment config shrunk to seconds per step on CPU."""
  config = deeplab_config.get_config()
  config.model.backbone = register_tiny_backbone()
  config.model.aspp_features = 16
  config.model.decoder_features = 16
  config.model.low_level_features = 8
  config.model.dtype = "float32"
  config.data.image_size = 32
  config.train.steps = steps
  config.train.batch_size = 8
  config.train.checkpoint_every = 2
  config.train.log_every = 1
  config.train.num_eval_examples = 8
  config.train.num_prediction_images = 2
  config.optim.warmup_steps = 0
  for key, value in overrides.items():
    section, name = key.split(".")
    setattr(config[section], name, value)
  return config


def tiny_unet_config(steps: int = 2, **model):
  """The U-Net experiment's config shrunk to seconds on CPU: 4 features, depth 2, 32x32
  synthetic images; `model` overrides config.model keys."""
  from experiments.configs import unet as unet_config  # pylint: disable=g-import-not-at-top
  config = unet_config.get_config()
  config.model.name, config.model.features, config.model.depth = "unet", 4, 2
  config.model.dtype = "float32"
  config.data.image_size = 32
  config.train.steps, config.train.batch_size = steps, 8
  config.train.num_eval_examples, config.train.num_prediction_images = 8, 0
  for key, value in model.items():
    config.model[key] = value
  return config


def sigterm_at_step(monkeypatch, step: int) -> None:
  """Sends this process SIGTERM, as a scheduler would, when a training loop reaches `step`
  (just before it asks whether to stop there)."""
  reached = distributed.Preemption.reached

  def wrapped(self, current):
    if current == step:
      os.kill(os.getpid(), signal.SIGTERM)
    return reached(self, current)

  monkeypatch.setattr(distributed.Preemption, "reached", wrapped)


ROOT = pathlib.Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def processes_in_sessions(runs):
  """Starts one process per (argv, env) of `runs` from the repository root, each in its own
  session; yields the Popens. Whatever happens, each is killed with its children (grain
  workers) at exit."""
  started = []
  try:
    for argv, env in runs:
      started.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    yield started
  finally:
    for proc in started:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
      proc.communicate()


def finish(started, timeout=600):
  """(return code, stdout, stderr) of each process."""
  outputs = [p.communicate(timeout=timeout) for p in started]
  return [(p.returncode, *out) for p, out in zip(started, outputs)]


def paused_at(module: str, step: int, pause_file, env) -> tuple[list[str], dict]:
  """(argv prefix, env) that run `python -m module` through tests.run_paused, pausing at
  `step` until SIGTERM (see sigterm_when_paused)."""
  return ([sys.executable, "-m", "tests.run_paused", module],
          dict(env, PAUSE_AT_STEP=str(step), PAUSE_FILE=str(pause_file)))


def sigterm_when_paused(started, pause_file, timeout=600):
  """Waits for the run to reach its pause, SIGTERMs process 0 there, returns `finish`."""
  deadline = time.monotonic() + timeout
  while not pathlib.Path(pause_file).exists():
    assert all(p.poll() is None for p in started), finish(started)[0][2][-3000:]
    assert time.monotonic() < deadline
    time.sleep(0.1)
  started[0].send_signal(signal.SIGTERM)
  return finish(started)


@contextlib.contextmanager
def tmpfs(mount_point: pathlib.Path, size: str):
  """A tmpfs of `size` (e.g. "1m") mounted at `mount_point` for a real full or read-only disk.
  Mounting needs root with mount privileges, which this machine and its CI have; elsewhere
  the test is skipped with the reason."""
  mount_point.mkdir(exist_ok=True)
  if shutil.which("mount") is None:
    pytest.skip("no mount command to make a small disk with")
  made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                         str(mount_point)], capture_output=True, text=True, check=False)
  if made.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here (needs root): {made.stderr.strip()}")
  try:
    yield mount_point
  finally:
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, check=False)
