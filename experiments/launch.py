"""What every experiment entry point shares: flag errors and user errors as one line."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Callable, Sequence

import jax
from absl import app, flags, logging

from jaxseg.errors import JaxsegError, first_line
from jaxseg.train import distributed

# Every entry point can be one process of a multi-host run (README: "Running on a Cloud TPU
# pod / multi-GPU"). Without these, SLURM, Open MPI and Cloud TPU VMs are detected, and a
# lone process runs as before.
_MAIN = {"module_name": sys.argv[0]}
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, the same for every process of a "
    "multi-process run (default: detected under SLURM, Open MPI and on Cloud TPU).", **_MAIN)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run (one per "
                                      "host), the same for every process.", **_MAIN)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, "
                                   "num_processes).", **_MAIN)


def _parse_flags(argv: Sequence[str]):
  """absl's parser, but a bad flag or config override is one line, not a usage dump."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as e:
    message = first_line(e)
    sys.exit(f"error: {message}")


def _check_config_keys(name: str, config, argv: Sequence[str]) -> None:
  """Exits with one line naming the first --NAME.a.b override that is not a config key."""
  prefix = f"--{name}."
  for arg in argv:
    if not arg.startswith(prefix):
      continue
    path = arg[len(prefix):].split("=", 1)[0].split(".")
    node = config
    for depth, key in enumerate(path):
      keys = sorted(node.keys()) if hasattr(node, "keys") else []
      if key not in keys:
        where = ".".join(path[:depth]) or "the top level"
        sys.exit(f"error: unknown config key {prefix}{'.'.join(path)}; valid keys under "
                 f"{where}: {', '.join(keys) or '(none: it is a value)'}")
      node = node[key]


def define_config(name: str, config, help_text: str):
  """config_flags.DEFINE_config_dict, with unknown override keys reported in one line.

  ml_collections applies overrides while the flag is defined (at import), raising a bare
  KeyError/AttributeError traceback for a typo; check the keys first.
  """
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _check_config_keys(name, config, sys.argv)
  return config_flags.DEFINE_config_dict(name, config, help_text)


def choose(value: str, choices: Sequence[str], flag: str) -> str:
  """Validates a selector flag against its registry."""
  if value not in choices:
    raise JaxsegError(f"unknown --{flag}={value!r}; valid choices: {', '.join(sorted(choices))}")
  return value


class DataFlags:
  """--dataset / --data_dir / --workdir, which every segmentation experiment takes."""

  def __init__(self, default_workdir: str):
    from jaxseg.data import DATASETS  # pylint: disable=g-import-not-at-top
    self._datasets = DATASETS
    # Listed under the entry point in --help, like the flags it defines itself.
    main = {"module_name": sys.argv[0]}
    self.dataset = flags.DEFINE_string(
        "dataset", None, f"Dataset: one of {', '.join(sorted(DATASETS))} (default: the "
        "config's, synthetic).", **main)
    self.data_dir = flags.DEFINE_string("data_dir", None, "Root of the dataset on disk.", **main)
    self.workdir = flags.DEFINE_string("workdir", None,
                                       f"Output directory (default {default_workdir}).", **main)

  def apply(self, config) -> None:
    """Writes the flags into the config (the flags win over --config.data.*)."""
    config.data.name = choose(self.dataset.value or config.data.name, self._datasets, "dataset")
    if self.data_dir.value:
      config.data.data_dir = self.data_dir.value


class ModelFlags:
  """--workdir (one run, or several for an ensemble), --weights and the test mode (--tta,
  --scales, --flip, --window): what experiments.evaluate and experiments.predict share."""

  def __init__(self):
    main = {"module_name": sys.argv[0]}
    self._workdir = flags.DEFINE_list(
        "workdir", None, "Run directory, or several (comma-separated) for an ensemble; "
        "predict and export also take a portable model file (.safetensors).",
        required=True, **main)
    self._weights = flags.DEFINE_list("weights", None, "Ensemble weights, one per run "
                                      "(default equal).", **main)
    self._tta = flags.DEFINE_bool("tta", False, "Test-time augmentation: scales 0.5-1.75 and "
                                  "horizontal flips.", **main)
    self._scales = flags.DEFINE_list("scales", None, "Test-time scales, e.g. 0.75,1,1.25.",
                                     **main)
    self._flip = flags.DEFINE_bool("flip", None, "Add mirrored views (default: with --tta).",
                                   **main)
    self._window = flags.DEFINE_string("window", None, "Sliding window HxW, or 0 for whole "
                                       "images (default: the dataset's evaluation setting; "
                                       "predict also windows images over twice the training "
                                       "size).", **main)
    self._checkpoint = flags.DEFINE_string(
        "checkpoint", "best", "Which checkpoint of each run: best (the one train.keep_best "
        "kept, else the newest), latest, or a step number.", **main)
    self._weights_source = flags.DEFINE_enum(
        "weights_source", "ema", ["ema", "raw"], "ema: a run's weight average where it kept "
        "one (train.ema_decay), else its raw weights; raw: the raw weights.", **main)

  @property
  def workdirs(self) -> list[str]:
    return self._workdir.value

  def weights(self) -> list[float] | None:
    return _numbers(self._weights.value, "weights") if self._weights.value else None

  def loading(self) -> dict:
    """load_run's options: {"checkpoint": "best" | "latest" | step, "weights": "ema" | "raw"}."""
    value = self._checkpoint.value
    return {"checkpoint": int(value) if value.isdigit() else value,
            "weights": self._weights_source.value}

  def tta(self):
    from jaxseg.inference import DEFAULT_TTA, TTA  # pylint: disable=g-import-not-at-top
    tta = DEFAULT_TTA if self._tta.value else TTA()
    scales = _numbers(self._scales.value, "scales") if self._scales.value else tta.scales
    return TTA(tuple(scales), tta.flip if self._flip.value is None else self._flip.value)

  def window(self):
    """(h, w), None (whole images) or "default" (the run's dataset's setting)."""
    from jaxseg import evaluate  # pylint: disable=g-import-not-at-top
    return evaluate.parse_window(self._window.value)


def _numbers(values: Sequence[str], flag: str) -> list[float]:
  try:
    return [float(v) for v in values]
  except ValueError:
    raise JaxsegError(f"--{flag}={','.join(values)}: expected numbers") from None


def report(summary: dict, workdir: str, pictures: Sequence[str] = ("predictions.png",)) -> None:
  """The one-line JSON result and where the outputs are."""
  keys = ("miou", "pixel_accuracy", "mean_dice", "steps", "train_seconds", "images_per_second")
  print(json.dumps({k: summary[k] for k in keys}))
  drawn = [p for p in pictures if os.path.exists(os.path.join(workdir, p))]  # 0 examples: none
  print(f"wrote {workdir}/summary.json, {', '.join([*drawn, 'metrics.jsonl', 'checkpoints/'])}")


def run(main: Callable[..., None], positional: bool = False) -> None:
  """app.run with one-line errors for everything a user can fix. With `positional`, main
  takes the command line's positional arguments (e.g. file names)."""

  def _main(argv):
    if len(argv) > 1 and not positional:
      sys.exit(f"error: unexpected arguments {' '.join(argv[1:])!r} (flags look like --name=value)")
    logging.set_verbosity(logging.INFO)
    # Orbax narrates every save at INFO and JAX every backend it probes; keep our own INFO
    # lines and everyone's warnings.
    logging.get_absl_handler().addFilter(
        lambda r: r.levelno >= logging.converter.STANDARD_WARNING
        or not any(noisy in r.pathname for noisy in ("orbax", "xla_bridge")))
    try:
      # Before anything touches a device: joining a run changes what jax.devices() lists.
      distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
      logging.info("JAX %s on %d %s device(s) (%d process(es)): %s", jax.__version__,
                   jax.device_count(), jax.default_backend(), jax.process_count(),
                   ", ".join(sorted({d.device_kind for d in jax.devices()})))
      # One report per run: the other processes of a multi-process run print nothing.
      with contextlib.ExitStack() as stack:
        if jax.process_index():
          stack.enter_context(contextlib.redirect_stdout(
              stack.enter_context(open(os.devnull, "w", encoding="utf-8"))))
        if positional:
          main(argv[1:])
        else:
          main()
    except (JaxsegError, FloatingPointError) as e:  # bad input, or training diverged
      sys.exit(f"error: {e}")
    except distributed.Preempted as e:  # a checkpoint was saved: the scheduler may restart us
      print(e)
      if e.exit_code:
        sys.exit(e.exit_code)

  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(_main, flags_parser=_parse_flags)
