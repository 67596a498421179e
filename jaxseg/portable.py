"""One portable model file: a trained CNN as safetensors, with what rebuilds it in its metadata.

    jaxseg.save_pretrained(jaxseg.runs.load_run("runs/unet_unet_synthetic"), "unet.safetensors")
    model = jaxseg.load_pretrained("unet.safetensors")      # a Run: .probabilities(images)

The tensors are the weights the run is used with (its weight average when it kept one), named
by their path ("params/backbone/stem/conv/kernel"); the metadata holds the experiment config,
the classes, the input (channels, dtype, normalisation) and where the weights came from.
Nothing in the file depends on the devices it was saved on, so it loads on any machine and
device count. `--config.model.init_from=FILE` starts a new run from it
(`jaxseg.train.model_file.initial_state`).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from jaxseg.errors import JaxsegError
from jaxseg.train.model_file import FORMAT, FORMAT_VERSION, read_metadata, read_tensors


def save_pretrained(run, path: str) -> dict[str, str]:
  """Writes `run` (runs.load_run's) to `path` (by way of a temporary file); returns the
  metadata written."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from jaxseg.version import __version__  # pylint: disable=g-import-not-at-top
  if hasattr(run, "members"):
    raise JaxsegError("an ensemble has no one set of weights: save each member")
  if getattr(run, "superpixels", None) is not None:
    raise JaxsegError("the superpixel GNN is not saved as a model file (its superpixels and "
                      "graphs are not part of a network); use its workdir")
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise JaxsegError(f"{path}: its folder {folder} does not exist")
  flat = traverse_util.flatten_dict(jax.device_get(run.variables), sep="/")
  tensors = {key: np.ascontiguousarray(value) for key, value in flat.items()}
  classes = run.classes
  metadata = {
      "format": FORMAT, "format_version": str(FORMAT_VERSION), "jaxseg_version": __version__,
      "model": run.name, "num_classes": str(run.num_classes),
      "config": json.dumps(run.config.to_dict()),
      "classes": json.dumps({"names": list(classes.names),
                             "palette": np.asarray(classes.palette).tolist(),
                             "ignore_index": int(classes.ignore_index),
                             "dataset": classes.dataset}),
      "input": json.dumps({"channels": run.in_channels, "dtype": run.image_dtype,
                           "preprocessing": run.preprocessing}),
      "source": json.dumps({"workdir": run.workdir, "step": run.step,
                            "weights": run.weights_source}),
  }
  tmp = path + ".tmp"
  try:
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)
  except OSError as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise JaxsegError(f"{path}: could not write ({e.strerror or e})") from None
  return metadata


def _abstract_variables(config, num_classes: int, in_channels: int):
  """(model, shapes of its variables) without computing anything."""
  from jaxseg.train import build  # pylint: disable=g-import-not-at-top
  model = build.segmentation_model(config, num_classes)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, 64, 64, in_channels)), train=False))
  return model, traverse_util.flatten_dict(shapes, sep="/")


def load_pretrained(path: str):
  """The model in `path` as a `runs.Run`; one line when the file is not one, or when its
  tensors do not fit the architecture its own config describes."""
  from jaxseg.runs import Run, make_preprocess  # pylint: disable=g-import-not-at-top
  from jaxseg.train.workdir import Classes  # pylint: disable=g-import-not-at-top
  meta = read_metadata(path)
  config = ml_collections.ConfigDict(meta["config"])
  channels = int(meta["input"]["channels"])
  model, expected = _abstract_variables(config, meta["num_classes"], channels)
  tensors = read_tensors(path)
  for key in sorted(set(expected) | set(tensors)):
    if key not in tensors:
      raise JaxsegError(f"{path}: {key} {tuple(expected[key].shape)} of {meta['model']} is "
                        "missing from the file")
    if key not in expected:
      raise JaxsegError(f"{path}: the file's {key} is not part of {meta['model']}")
    if tuple(expected[key].shape) != tensors[key].shape:
      raise JaxsegError(f"{path}: {key} is {tensors[key].shape} in the file but "
                        f"{tuple(expected[key].shape)} in {meta['model']}")
  variables = traverse_util.unflatten_dict(
      {k: jnp.asarray(np.array(v, copy=True)) for k, v in tensors.items()}, sep="/")
  c = meta["classes"]
  classes = Classes(tuple(c["names"]), np.asarray(c["palette"], np.uint8),
                    int(c["ignore_index"]), c.get("dataset", ""))
  spec = meta["input"]["preprocessing"]
  return Run(config, model, variables, make_preprocess(spec), meta["num_classes"],
             int(meta["source"]["step"]), classes, os.path.abspath(path),
             meta["source"]["weights"], channels, meta["input"]["dtype"], spec)


