"""The jaxseg model file (safetensors with the config and classes in its metadata): reading
it, and starting a run from it (`--config.model.init_from`). Writing and loading it as a
model is jaxseg.portable's (`save_pretrained`, `load_pretrained`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from absl import logging
from flax import traverse_util

from jaxseg.errors import JaxsegError
from jaxseg.train import ema as ema_lib

FORMAT = "jaxseg-model"
FORMAT_VERSION = 1


def read_metadata(path: str) -> dict[str, Any]:
  """The file's metadata, parsed; one line when it is missing, not safetensors, truncated, not
  a jaxseg model file or of another format version."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise JaxsegError(f"{path}: no such model file")
  try:
    with safe_open(path, framework="numpy") as f:
      raw = f.metadata() or {}
  except Exception as e:  # pylint: disable=broad-except  # safetensors' errors vary by damage
    raise JaxsegError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})"
                      ) from None
  if raw.get("format") != FORMAT:
    raise JaxsegError(f"{path}: a safetensors file but not a jaxseg model file (no "
                      f"format={FORMAT!r} in its metadata)")
  if raw.get("format_version") != str(FORMAT_VERSION):
    raise JaxsegError(f"{path}: jaxseg model format version {raw.get('format_version')}, this "
                      f"jaxseg reads version {FORMAT_VERSION}")
  meta = dict(raw)
  for key in ("config", "classes", "input", "source"):
    meta[key] = json.loads(raw[key])
  meta["num_classes"] = int(raw["num_classes"])
  return meta


def read_tensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    return load_file(path)
  except Exception as e:  # pylint: disable=broad-except
    raise JaxsegError(f"{path}: its tensors are not readable ({str(e).splitlines()[0]})") from None


def initial_state(state, path: str, flag: str = "--config.model.init_from"):
  """`state` with its params and BatchNorm statistics taken from the model file `path`.

  Every variable must be in the file with the same shape, except the classifier's when the
  class counts differ: those keep their fresh initialisation, and one log line says so.
  Anything else (another architecture, backbone or width) is one line naming the first
  variable that does not fit. The weight average, if any, restarts from the result.
  """
  meta = read_metadata(path)
  tensors = read_tensors(path)
  theirs = meta["num_classes"]
  fresh, kept = [], {}
  for collection in ("params", "batch_stats"):
    flat = traverse_util.flatten_dict(getattr(state, collection), sep="/")
    for key, value in flat.items():
      name = f"{collection}/{key}"
      if name not in tensors:
        raise JaxsegError(f"{flag}={path}: holds a {meta['model']} without this run's "
                          f"{name} {tuple(value.shape)}; start from a file of the same model")
      saved = tensors[name]
      if saved.shape == tuple(value.shape):
        # A copy in memory of its own: safetensors' arrays are read-only views of the file's
        # bytes, and a train step that donates its state would write into them.
        flat[key] = np.array(saved, dtype=value.dtype, copy=True)
      elif (saved.shape[:-1] == tuple(value.shape[:-1]) and saved.shape[-1] == theirs
            and value.shape[-1] != theirs):
        fresh.append(name)  # the classifier of another class count
      else:
        raise JaxsegError(f"{flag}={path}: {name} is {saved.shape} in the file but "
                          f"{tuple(value.shape)} in this run's model ({meta['model']} there)")
    kept[collection] = traverse_util.unflatten_dict(flat, sep="/")
  if fresh:
    logging.info("%s: %d classes there, %d here: the classifier (%s) starts afresh", path,
                 theirs, _num_classes(fresh, state), ", ".join(fresh))
  replaced = dict(kept)
  if ema_lib.has_average(state):
    replaced["ema"] = ema_lib.init(kept["params"], kept["batch_stats"])
  return state.replace(**replaced), fresh


def _num_classes(fresh: list[str], state) -> int:
  flat = traverse_util.flatten_dict(state.params, sep="/")
  return int(flat[fresh[0].split("/", 1)[1]].shape[-1])
