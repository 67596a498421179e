"""Weight files are data, never code, and never a way to read other files; bad input gets one
line naming the file and leaves no output directory behind."""

import json
import os
import struct

import h5py
import numpy as np
import pytest

from jaxseg import weights
from jaxseg.errors import JaxsegError


def _convert_fails(source, arch, path, tmp_path, match):
  out = tmp_path / "out"
  with pytest.raises(JaxsegError) as err:
    weights.convert_file(source, arch, str(path), str(out))
  message = str(err.value)
  assert message.startswith(f"{path}: ") and "\n" not in message, message
  assert match in message, message
  assert not out.exists() and not any(p.name.startswith("out") for p in tmp_path.iterdir())
  return message


# --- PyTorch ------------------------------------------------------------------------------------


class _Payload:
  """Unpickling this runs a shell command: what a malicious .pth does."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def test_pickle_payload_pth_is_refused_and_never_runs(tmp_path):
  torch = pytest.importorskip("torch")
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pth"
  torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "extra": _Payload(marker)}, path)
  message = _convert_fails("torch", "resnet50", path, tmp_path,
                           "refused by torch.load(weights_only=True)")
  assert "it references posix.system" in message or "it references os.system" in message
  assert not marker.exists()


def test_old_torch_is_refused(tmp_path, monkeypatch):
  torch = pytest.importorskip("torch")
  path = tmp_path / "ok.pth"
  torch.save({"conv1.weight": torch.zeros(1)}, path)
  monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
  _convert_fails("torch", "resnet50", path, tmp_path, "CVE-2025-32434")


def _safetensors(path, header: bytes, data: bytes = b""):
  path.write_bytes(struct.pack("<Q", len(header)) + header + data)
  return path


@pytest.mark.parametrize("case", ["huge header length", "offsets past the end", "overlapping",
                                  "not json", "shape and size disagree"])
def test_crafted_safetensors_header_is_refused(tmp_path, case):
  path = tmp_path / "crafted.safetensors"
  tensor = {"dtype": "F32", "shape": [64, 3, 7, 7], "data_offsets": [0, 64 * 3 * 49 * 4]}
  if case == "huge header length":
    path.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
  elif case == "offsets past the end":
    _safetensors(path, json.dumps({"conv1.weight": tensor}).encode(), b"\0" * 16)
  elif case == "overlapping":
    a = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    b = {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}
    _safetensors(path, json.dumps({"a": a, "b": b}).encode(), b"\0" * 24)
  elif case == "not json":
    _safetensors(path, b"\x80\x04\x95 pickle?", b"")
  else:
    bad = {"dtype": "F32", "shape": [1000], "data_offsets": [0, 16]}
    _safetensors(path, json.dumps({"conv1.weight": bad}).encode(), b"\0" * 16)
  _convert_fails("torch", "resnet50", path, tmp_path, "not a valid safetensors file")


def test_truncated_files_name_the_file(tmp_path):
  from safetensors.numpy import save_file
  full = tmp_path / "full.safetensors"
  save_file({"conv1.weight": np.ones((64, 3, 7, 7), np.float32)}, str(full))
  cut = tmp_path / "cut.safetensors"
  cut.write_bytes(full.read_bytes()[:5000])
  _convert_fails("torch", "resnet50", cut, tmp_path, "not a valid safetensors file")
  torch = pytest.importorskip("torch")
  pth = tmp_path / "full.pth"
  torch.save({"conv1.weight": torch.ones(64, 3, 7, 7)}, pth)
  cut_pth = tmp_path / "cut.pth"
  cut_pth.write_bytes(pth.read_bytes()[:3000])
  _convert_fails("torch", "resnet50", cut_pth, tmp_path, "cannot read as a PyTorch file")


def test_non_tensor_values_are_refused(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "mixed.pth"
  torch.save({"conv1.weight": torch.zeros(1), "note": "hello"}, path)
  _convert_fails("torch", "resnet50", path, tmp_path, "key 'note' holds a str, not a tensor")


# --- Keras / HDF5 -------------------------------------------------------------------------------


def _keras2_file(path, build):
  """A Keras 2 layout file (layer_names / weight_names) whose one layer `build` fills."""
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = [b"conv1_conv"]
    group = f.create_group("conv1_conv")
    group.attrs["weight_names"] = [b"conv1_conv/kernel:0"]
    build(f, group)
  return path


def test_external_storage_dataset_is_refused(tmp_path):
  secret = tmp_path / "secret.bin"
  secret.write_bytes(np.arange(7 * 7 * 3 * 64, dtype=np.float32).tobytes())

  def build(f, group):
    group.create_dataset("conv1_conv/kernel:0", shape=(7, 7, 3, 64), dtype="f4",
                         external=[(str(secret), 0, secret.stat().st_size)])

  path = _keras2_file(tmp_path / "external.h5", build)
  message = _convert_fails("keras", "resnet50", path, tmp_path, "has external storage")
  assert "/conv1_conv/conv1_conv/kernel:0" in message


@pytest.mark.parametrize("kind", ["soft", "external"])
def test_links_are_refused(tmp_path, kind):
  other = tmp_path / "other.h5"
  with h5py.File(other, "w") as f:
    f["data"] = np.zeros((7, 7, 3, 64), np.float32)

  def build(f, group):
    f["real"] = np.zeros((7, 7, 3, 64), np.float32)
    sub = group.create_group("conv1_conv")
    sub["kernel:0"] = (h5py.SoftLink("/real") if kind == "soft"
                       else h5py.ExternalLink(str(other), "/data"))

  path = _keras2_file(tmp_path / f"{kind}.h5", build)
  _convert_fails("keras", "resnet50", path, tmp_path,
                 f"is a {kind} link")


def test_virtual_dataset_is_refused(tmp_path):
  other = tmp_path / "source.h5"
  with h5py.File(other, "w") as f:
    f["data"] = np.zeros((64,), np.float32)

  def build(f, group):
    layout = h5py.VirtualLayout(shape=(64,), dtype="f4")
    layout[:] = h5py.VirtualSource(str(other), "data", shape=(64,))
    group.create_group("conv1_conv").create_virtual_dataset("kernel:0", layout)

  path = _keras2_file(tmp_path / "virtual.h5", build)
  _convert_fails("keras", "resnet50", path, tmp_path, "virtual dataset")


def test_truncated_and_foreign_keras_files(tmp_path):
  good = _keras2_file(tmp_path / "good.h5", lambda f, g: g.create_dataset(
      "conv1_conv/kernel:0", data=np.zeros((7, 7, 3, 64), np.float32)))
  cut = tmp_path / "cut.h5"
  cut.write_bytes(good.read_bytes()[:1500])
  _convert_fails("keras", "resnet50", cut, tmp_path, "cannot read as a Keras weights file")
  foreign = tmp_path / "foreign.h5"
  with h5py.File(foreign, "w") as f:
    f["images"] = np.zeros((2, 2), np.float32)
  _convert_fails("keras", "resnet50", foreign, tmp_path, "unknown key layout")
  # The one layer it holds maps; the rest of ResNet-50 is missing, named by its first key.
  _convert_fails("keras", "resnet50", good, tmp_path, "no tensor 'conv1_conv/bias'")


def test_arguments_are_checked_before_reading(tmp_path):
  with pytest.raises(JaxsegError, match="--arch='resnet18' has no keras converter; valid: "
                                        "inception_v3, resnet101, resnet50, xception"):
    weights.convert_file("keras", "resnet18", "x.h5", str(tmp_path / "out"))
  with pytest.raises(JaxsegError, match="--source='onnx' is not one of keras, torch"):
    weights.convert_file("onnx", "resnet50", "x.onnx", str(tmp_path / "out"))
  with pytest.raises(JaxsegError, match="missing.h5: no such file"):
    weights.convert_file("keras", "resnet50", str(tmp_path / "missing.h5"), str(tmp_path / "o"))
  (tmp_path / "w.safetensors").write_bytes(b"")
  with pytest.raises(JaxsegError, match=r"--source=keras reads \.h5, \.hdf5, \.keras files"):
    weights.convert_file("keras", "resnet50", str(tmp_path / "w.safetensors"),
                         str(tmp_path / "o"))
  (tmp_path / "taken").mkdir()
  with pytest.raises(JaxsegError, match="taken: already exists"):
    weights.convert_file("keras", "resnet50", str(tmp_path / "w.safetensors"),
                         str(tmp_path / "taken"))


def test_not_a_pretrained_directory(tmp_path):
  with pytest.raises(JaxsegError, match="not a pretrained backbone"):
    weights.load_backbone(str(tmp_path))
