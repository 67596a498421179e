"""Reading weight files as data, never as code: {tensor name: numpy array}.

- Keras `.h5` (Keras 2 / legacy `save_weights` and `model.save` files, which is what the
  keras.applications ImageNet downloads are), Keras 3 `.weights.h5`, and `.keras` archives (the
  weights file inside the zip). Read with h5py only: no TensorFlow, no `keras.models.load_model`
  (which would deserialise the model's config and any custom objects it names).
- PyTorch `.safetensors` (the safetensors library, no torch needed) and `.pth` / `.pt`
  (torch imported lazily, `torch.load(weights_only=True)`, torch >= 2.6 where the known
  weights_only bypass, CVE-2025-32434, is fixed).

HDF5 can point outside the file: external-storage datasets, external and soft links and virtual
datasets can make h5py read any local file. Such files are refused before any data is read.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile

import numpy as np

from jaxseg.errors import JaxsegError, first_line

KERAS_SUFFIXES = (".h5", ".hdf5", ".keras")
TORCH_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
MIN_TORCH = (2, 6)


def _fail(path, message) -> JaxsegError:
  return JaxsegError(f"{path}: {message}")


# ---------------------------------------------------------------------------------------------
# Keras


def _check_hdf5_is_self_contained(path, group, prefix=""):
  """Refuses links and datasets whose bytes live outside this file."""
  import h5py  # pylint: disable=import-outside-toplevel

  for name in group:
    link = group.get(name, getlink=True)
    where = f"{prefix}/{name}"
    if isinstance(link, (h5py.SoftLink, h5py.ExternalLink)):
      kind = "soft" if isinstance(link, h5py.SoftLink) else "external"
      raise _fail(path, f"refused: HDF5 object {where} is a {kind} link (weight files must "
                        "hold their own data)")
    item = group[name]
    if isinstance(item, h5py.Group):
      _check_hdf5_is_self_contained(path, item, where)
    elif isinstance(item, h5py.Dataset):
      if item.is_virtual:
        raise _fail(path, f"refused: HDF5 dataset {where} is a virtual dataset")
      if item.external:
        raise _fail(path, f"refused: HDF5 dataset {where} has external storage "
                          f"({item.external[0][0]!r})")
      if item.dtype.kind not in "fiub":
        raise _fail(path, f"refused: HDF5 dataset {where} holds {item.dtype}, not numbers")


def _decode(names):
  return [n.decode("utf8") if isinstance(n, bytes) else str(n) for n in names]


def _tensor_name(layer: str, weight_name: str) -> str:
  """'conv1_conv/kernel:0' -> 'conv1_conv/kernel'; a bare 'kernel:0' gets its layer's name."""
  parts = weight_name.split(":")[0].split("/")
  return "/".join(parts[-2:]) if len(parts) >= 2 else f"{layer}/{parts[0]}"


def _read_legacy_h5(path, root):
  """Keras 2 layout: attrs layer_names, per layer attrs weight_names naming its datasets."""
  tensors = {}
  for layer in _decode(root.attrs["layer_names"]):
    group = root[layer]
    for weight_name in _decode(group.attrs.get("weight_names", [])):
      tensors[_tensor_name(layer, weight_name)] = np.asarray(group[weight_name])
  return tensors


# Keras 3 stores a layer's variables as vars/0, vars/1, ... in creation order.
_KERAS3_VARS = {"conv2d": ("kernel", "bias"),
                "separable_conv2d": ("depthwise_kernel", "pointwise_kernel", "bias"),
                "depthwise_conv2d": ("depthwise_kernel", "bias"),
                "batch_normalization": ("gamma", "beta", "moving_mean", "moving_variance"),
                "dense": ("kernel", "bias")}


def _read_keras3_h5(path, root):
  """Keras 3 layout: layers/<class>_<n>/vars/<i>, the layer's own name in the `name` attr."""
  tensors = {}
  for key, group in root["layers"].items():
    if "vars" not in group or not len(group["vars"]):
      continue
    kind = re.sub(r"_\d+$", "", key)
    if kind not in _KERAS3_VARS:
      raise _fail(path, f"unknown key layout: layers/{key} is not a conv, BatchNorm or dense "
                        "layer of a keras.applications backbone")
    layer = group["vars"].attrs.get("name")
    if layer is None:
      raise _fail(path, f"layers/{key}/vars has no layer name (an early Keras 3 file): load it "
                        "in Keras and save it again with model.save_weights(...)")
    layer = _decode([layer])[0]
    names = _KERAS3_VARS[kind]
    if kind == "batch_normalization" and len(group["vars"]) == 3:
      # BatchNormalization(scale=False), as Inception-v3 builds it: no gamma. (center=False
      # would also leave 3, but no keras.applications backbone uses it.)
      names = names[1:]
    for i, array in sorted(group["vars"].items(), key=lambda kv: int(kv[0])):
      tensors[f"{layer}/{names[int(i)]}"] = np.asarray(array)
  return tensors


def read_keras(path: str) -> dict[str, np.ndarray]:
  """{'layer/weight': array} from a Keras .h5, .weights.h5 or .keras file."""
  import h5py  # pylint: disable=import-outside-toplevel

  try:
    if path.endswith(".keras"):
      with zipfile.ZipFile(path) as archive:
        if "model.weights.h5" not in archive.namelist():
          raise _fail(path, "no model.weights.h5 inside this .keras archive")
        source = io.BytesIO(archive.read("model.weights.h5"))
    else:
      source = path
    with h5py.File(source, "r") as f:
      _check_hdf5_is_self_contained(path, f)
      if "layers" in f:
        return _read_keras3_h5(path, f)
      root = f["model_weights"] if "model_weights" in f else f
      if "layer_names" in root.attrs:
        return _read_legacy_h5(path, root)
      raise _fail(path, "unknown key layout: neither Keras 3 (layers/...) nor Keras 2 "
                        f"(layer_names) weights; top-level keys: {sorted(f)[:5]}")
  except JaxsegError:
    raise
  except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
    raise _fail(path, f"cannot read as a Keras weights file ({type(e).__name__}: "
                      f"{first_line(e)})") from e


# ---------------------------------------------------------------------------------------------
# PyTorch


def _torch_version(version: str) -> tuple[int, int]:
  major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
  return int(major), int(minor)


def _unwrap_state_dict(path, obj):
  """Training checkpoints nest the weights ({'state_dict': ...}, {'model': ...})."""
  for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
      obj = obj[key]
      break
  if not isinstance(obj, dict):
    raise _fail(path, f"holds a {type(obj).__name__}, not a state dict")
  # nn.DataParallel / DistributedDataParallel prefix every key with "module.".
  if obj and all(k.startswith("module.") for k in obj):
    obj = {k[len("module."):]: v for k, v in obj.items()}
  return obj


def _read_pth(path):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise _fail(path, "reading .pth/.pt needs PyTorch (pip install 'torch>=2.6'), or convert "
                      "the file to .safetensors, which needs no torch") from e
  if _torch_version(torch.__version__) < MIN_TORCH:
    raise _fail(path, f"torch {torch.__version__} has a known weights_only bypass "
                      "(CVE-2025-32434); upgrade to torch >= 2.6 to read .pth files")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    first = first_line(e)
    if isinstance(e, pickle.UnpicklingError):
      culprit = re.search(r"unsupported global:?(?: GLOBAL)? ([\w.]+)", str(e), re.IGNORECASE)
      what = f"it references {culprit.group(1)}" if culprit else first
      raise _fail(path, "refused by torch.load(weights_only=True): the file holds more than "
                        f"tensors ({what})") from e
    raise _fail(path, f"cannot read as a PyTorch file ({type(e).__name__}: {first})") from e
  state = _unwrap_state_dict(path, obj)
  tensors = {}
  for key, value in state.items():
    if not isinstance(value, torch.Tensor):
      raise _fail(path, f"key {key!r} holds a {type(value).__name__}, not a tensor")
    value = value.detach()
    if value.dtype in (torch.bfloat16, torch.float16):
      value = value.float()
    tensors[key] = value.numpy()
  return tensors


def _read_safetensors(path):
  from safetensors import SafetensorError  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

  try:
    return dict(load_file(path))
  except (SafetensorError, OSError, ValueError, TypeError) as e:
    first = first_line(e)
    raise _fail(path, f"not a valid safetensors file ({first})") from e


def read_torch(path: str) -> dict[str, np.ndarray]:
  """{state-dict key: array} from .safetensors (preferred) or .pth / .pt / .bin."""
  if path.endswith(".safetensors"):
    return _read_safetensors(path)
  return _read_pth(path)


def read(source: str, path: str) -> dict[str, np.ndarray]:
  """The tensors of `path`, read as `source` ("keras" or "torch") expects."""
  if not os.path.isfile(path):
    raise JaxsegError(f"{path}: no such file")
  suffixes = KERAS_SUFFIXES if source == "keras" else TORCH_SUFFIXES
  if not path.endswith(suffixes):
    raise _fail(path, f"--source={source} reads {', '.join(suffixes)} files")
  return read_keras(path) if source == "keras" else read_torch(path)
