"""Trained models out of jaxseg: serialised StableHLO that runs with `jax` and `numpy` alone,
and ONNX that runs with onnxruntime.

    python -m experiments.export --workdir=runs/unet_unet_synthetic --format=stablehlo,onnx \
        --out=exported/unet

writes OUT/model.stablehlo (the bytes of `jax.export.Exported.serialize()`), OUT/model.onnx
and OUT/model.json (classes, palette, the input the function takes and the size rule). These
names and the call convention are the public contract:

    exported = jax.export.deserialize(bytearray(open("OUT/model.stablehlo", "rb").read()))
    probabilities, labels = exported.call(images)   # (B, H, W, C) uint8 -> f32 (B,H,W,K), i32
    probabilities, labels = onnxruntime.InferenceSession("OUT/model.onnx").run(
        None, {"images": images})

Normalisation is inside the function; batch, height and width are symbolic. Each image is
padded (bottom and right, with zeros after normalisation, as mmsegmentation's data
preprocessor does) to a multiple of the network's stride and the result cropped back: with
symbolic sizes the skip connections and dilated convolutions need sizes the stride divides.
On sizes the stride already divides the exported function equals `load_run(RUN).probabilities`.

The ONNX file (jax2onnx, opset `ONNX_OPSET`) has a symbolic batch but a fixed height and width
(`--size`, by default the run's training size): jax2onnx cannot carry the pad-to-stride sizes
(floor divisions of a symbolic size) through convolutions, max-pools and skip connections.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg import inference
from jaxseg.errors import JaxsegError, first_line
from jaxseg.inference import NO_TTA, TTA
from jaxseg.train.workdir import ensure_writable

FORMATS = ("stablehlo", "onnx", "safetensors")
DEFAULT_FORMATS = ("stablehlo",)
STABLEHLO_FILE = "model.stablehlo"
ONNX_FILE = "model.onnx"
# ONNX operator set of model.onnx: onnxruntime >= 1.18 runs it. jax2onnx writes ReduceMean with
# its axes as an input, which opset 18 introduced.
ONNX_OPSET = 21
SAFETENSORS_FILE = "model.safetensors"  # jaxseg.save_pretrained's file: weights + config
METADATA_FILE = "model.json"
FORMAT_VERSION = 1
STRIDE = 32  # every CNN here downsamples by at most 32


def _members(model) -> tuple[list, list[float]]:
  members = getattr(model, "members", None)
  if members is None:
    return [model], [1.0]
  return list(members), list(model.weights)


def min_size(run) -> int:
  """The smallest height and width the exported function takes (1: any).

  DeepLab's ASPP convolutions of rate r at output stride s see only zeros beyond the feature
  map; with concrete sizes jaxseg leaves out the taps that fall off a small map, which a
  symbolic size cannot decide, so sizes must keep every tap inside: s * max(r) + 1.
  """
  model = run.model
  rates = getattr(model, "aspp_rates", None)
  if not hasattr(model, "output_stride") or not hasattr(model, "aspp_features"):
    return 1
  from jaxseg.models.deeplab import ASPP_RATES  # pylint: disable=g-import-not-at-top
  rates = rates or ASPP_RATES[model.output_stride]
  return model.output_stride * max(rates) + 1


def serving_function(model, tta: TTA = NO_TTA, stride: int = STRIDE):
  """f(images (B, H, W, C) of the model's input dtype) -> (probabilities float32 (B, H, W, K),
  labels int32 (B, H, W)) of a run or an ensemble (weighted mean of the members'
  probabilities), its weights held as constants.

  Traced at a fixed size (ONNX) it computes what `Run.probabilities(images, tta=tta)` does,
  multi-scale views included. At a symbolic size (StableHLO) each view is padded to a multiple
  of `stride` and cropped back, and only `tta.flip` can be baked in: a rescaled view of a
  symbolic size has no exact size."""
  members, weights = _members(model)
  if getattr(members[0], "superpixels", None) is not None:
    raise JaxsegError("the superpixel GNN cannot be exported: its SLIC superpixels and region "
                      "graphs are computed in numpy, outside any traced function")
  parts = [(m.model, jax.device_get(m.variables), m.preprocess, w)
           for m, w in zip(members, weights)]

  def padded(apply, x):
    h, w = x.shape[1:3]
    x = jnp.pad(x, ((0, 0), (0, stride * ((h + stride - 1) // stride) - h),
                    (0, stride * ((w + stride - 1) // stride) - w), (0, 0)))
    return apply(x)[:, :h, :w]

  def serve(images):
    total = 0.0
    for module, variables, preprocess, weight in parts:
      x = preprocess(images)
      apply = functools.partial(_logits, module, variables)
      # Flipped views in calls of their own: jax2onnx cannot split a symbolic batch in two.
      if all(isinstance(d, int) for d in x.shape[1:3]):
        p = inference.tta_scores(apply, x, tta, stack_flips=False)  # what Run.probabilities does
      else:
        _check_symbolic_tta(tta)
        p = inference.tta_scores(functools.partial(padded, apply), x, tta, stack_flips=False)
      total = total + weight * p
    return total, jnp.argmax(total, axis=-1).astype(jnp.int32)

  return serve


def _logits(module, variables, x):
  return module.apply(variables, x, train=False).astype(jnp.float32)


def _check_symbolic_tta(tta: TTA) -> None:
  if tta.scales != (1.0,):
    raise JaxsegError(f"--scales={','.join(map(str, tta.scales))}: model.stablehlo takes any "
                      "image size, and a rescaled view of a symbolic size has no exact size; "
                      "bake in --flip only, or export the scales to ONNX alone (--format=onnx: "
                      "a fixed --size)")


def _write(path: str, data: bytes) -> None:
  """`data` to `path` by way of a temporary file and a rename: never half a file."""
  tmp = path + ".tmp"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except OSError as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise JaxsegError(f"--out: could not write {path} ({e.strerror or e})") from None


def metadata(model, *, tta: TTA, formats: Sequence[str], smallest: int,
             fixed_size: tuple[int, int] | None = None) -> dict[str, Any]:
  from jaxseg.version import __version__  # pylint: disable=g-import-not-at-top
  members, weights = _members(model)
  first = members[0]
  channels = int(getattr(first, "in_channels", 3))
  return {
      "format_version": FORMAT_VERSION, "jaxseg_version": __version__,
      "files": {f: {"stablehlo": STABLEHLO_FILE, "onnx": ONNX_FILE,
                    "safetensors": SAFETENSORS_FILE}[f] for f in formats},
      "model": getattr(model, "name", ""),
      "members": [{"workdir": m.workdir, "step": m.step, "weights_source": m.weights_source,
                   "weight": w} for m, w in zip(members, weights)],
      "class_names": list(first.classes.names), "palette": np.asarray(
          first.classes.palette).tolist(), "ignore_index": int(first.classes.ignore_index),
      "input": {"name": "images", "layout": "NHWC",
                "channels": channels,
                "dtype": str(getattr(first, "image_dtype", "uint8")),
                "size_rule": f"any height and width >= {smallest}; padded inside to a multiple "
                             f"of {STRIDE} and cropped back",
                "min_size": smallest, "pad_to_multiple_of": STRIDE},
      "outputs": [{"name": "probabilities", "dtype": "float32", "shape": "B, H, W, K"},
                  {"name": "labels", "dtype": "int32", "shape": "B, H, W"}],
      "tta": tta.describe(),
      **({"onnx": {"file": ONNX_FILE, "opset": ONNX_OPSET, "input_shape": ["B", *fixed_size,
                                                                           channels],
                   "size_rule": f"batch any; height and width exactly {fixed_size[0]}x"
                                f"{fixed_size[1]} (--size)"}} if fixed_size else {}),
  }


def export_stablehlo(model, tta: TTA = NO_TTA) -> tuple[bytes, int]:
  """(serialised jax.export of `serving_function`, its smallest height and width)."""
  members, _ = _members(model)
  first = members[0]
  smallest = max(min_size(m) for m in members)
  channels, dtype = int(getattr(first, "in_channels", 3)), getattr(first, "image_dtype", "uint8")
  constraints = [f"h >= {smallest}", f"w >= {smallest}"] if smallest > 1 else []
  shape = jax.export.symbolic_shape(f"b, h, w, {channels}", constraints=constraints)
  spec = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
  exported = jax.export.export(jax.jit(serving_function(model, tta)))(spec)
  return bytes(exported.serialize()), smallest


def onnx_size(model, size: Sequence[int] | None) -> tuple[int, int]:
  """The fixed (height, width) of the ONNX input: `size`, else the run's training size."""
  from jaxseg import runs  # pylint: disable=g-import-not-at-top
  if size:
    if len(size) != 2 or min(size) < 1:
      raise JaxsegError(f"--size={'x'.join(map(str, size))}: give HxW, two positive numbers")
    return int(size[0]), int(size[1])
  trained = runs.training_size(_members(model)[0][0])
  if not trained:
    raise JaxsegError("--format=onnx: the ONNX file takes one image size and this run records "
                      "no training size; give --size=HxW")
  return trained


def _jax2onnx():
  try:
    import jax2onnx  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise JaxsegError("--format=onnx needs jax2onnx, onnx and onnxruntime: pip install "
                      "'jaxseg[export]'") from None
  return jax2onnx


@contextlib.contextmanager
def _quiet(*loggers):
  """jax2onnx and onnx_ir log every fallback they take at WARNING, and jax2onnx 0.12's conv
  binding prints debug lines; keep the export's output to what it wrote."""
  saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
  for logger, _ in saved:
    logger.setLevel(logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    for logger, level in saved:
      logger.setLevel(level)


def export_onnx(model, tta: TTA = NO_TTA, size: Sequence[int] | None = None) -> bytes:
  """The serialised ONNX ModelProto of `serving_function`: input "images" (B, H, W, C) with a
  symbolic batch and the fixed `onnx_size`, outputs "probabilities" and "labels"."""
  jax2onnx = _jax2onnx()
  first = _members(model)[0][0]
  spec = jax.ShapeDtypeStruct(("B", *onnx_size(model, size), int(getattr(first, "in_channels", 3))),
                              jnp.dtype(getattr(first, "image_dtype", "uint8")))
  with _quiet("jax2onnx", "onnx_ir"):
    proto = jax2onnx.to_onnx(serving_function(model, tta), inputs=[spec],
                             model_name=getattr(model, "name", "jaxseg").replace("/", "_"),
                             opset=ONNX_OPSET, input_names=["images"],
                             output_names=["probabilities", "labels"])
  return proto.SerializeToString()


def export(model, out_dir: str, *, formats: Sequence[str] = DEFAULT_FORMATS,
           tta: TTA = NO_TTA, size: Sequence[int] | None = None) -> dict[str, Any]:
  """Writes the exported files and model.json into `out_dir`; returns model.json's content."""
  unknown = [f for f in formats if f not in FORMATS]
  if unknown or not formats:
    raise JaxsegError(f"--format={','.join(formats)}: valid formats are {', '.join(FORMATS)}")
  if "stablehlo" in formats:
    _check_symbolic_tta(tta)
  fixed = None
  if "onnx" in formats:  # before anything is written: the extra installed, a size known
    _jax2onnx()
    fixed = onnx_size(model, size)
  parent = os.path.dirname(os.path.abspath(out_dir))
  if not os.path.isdir(parent):
    raise JaxsegError(f"--out={out_dir}: its folder {parent} does not exist")
  ensure_writable(out_dir, "out")  # a probe file: os.access says yes to root on a read-only disk
  if "safetensors" in formats and tta.num_views > 1:
    raise JaxsegError("--format=safetensors holds the network's weights, not a test mode: "
                      "drop --flip/--tta")
  smallest = max(min_size(m) for m in _members(model)[0])
  if "stablehlo" in formats:
    blob, smallest = export_stablehlo(model, tta)
    _write(os.path.join(out_dir, STABLEHLO_FILE), blob)
  if "onnx" in formats:
    _write(os.path.join(out_dir, ONNX_FILE), export_onnx(model, tta, fixed))
  if "safetensors" in formats:
    from jaxseg import portable  # pylint: disable=g-import-not-at-top
    portable.save_pretrained(model, os.path.join(out_dir, SAFETENSORS_FILE))
  meta = metadata(model, tta=tta, formats=formats, smallest=smallest, fixed_size=fixed)
  _write(os.path.join(out_dir, METADATA_FILE), json.dumps(meta, indent=1).encode())
  return meta


def load(out_dir: str):
  """(the deserialised jax.export.Exported, model.json) of an export; one line when either
  file is missing, truncated or not one."""
  meta_path = os.path.join(out_dir, METADATA_FILE)
  try:
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
  except FileNotFoundError:
    raise JaxsegError(f"{meta_path}: no such file (an export writes it beside "
                      f"{STABLEHLO_FILE})") from None
  except (OSError, ValueError) as e:
    raise JaxsegError(f"{meta_path}: not readable JSON ({e})") from None
  if meta.get("format_version") != FORMAT_VERSION:
    raise JaxsegError(f"{meta_path}: export format {meta.get('format_version')!r}, this jaxseg "
                      f"reads {FORMAT_VERSION}")
  path = os.path.join(out_dir, STABLEHLO_FILE)
  try:
    with open(path, "rb") as f:
      exported = jax.export.deserialize(bytearray(f.read()))
  except FileNotFoundError:
    raise JaxsegError(f"{path}: no such file") from None
  except Exception as e:  # pylint: disable=broad-except  # flatbuffers' errors vary
    raise JaxsegError(f"{path}: not a serialised jax.export module (corrupt or truncated: "
                      f"{type(e).__name__})") from None
  return exported, meta


def onnx_session(out_dir: str, threads: int | None = None):
  """An onnxruntime session of OUT/model.onnx (every provider this onnxruntime has); one line
  when the file is missing, truncated or not ONNX."""
  try:
    import onnxruntime  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise JaxsegError("running model.onnx needs onnxruntime: pip install 'jaxseg[export]'"
                      ) from None
  path = os.path.join(out_dir, ONNX_FILE)
  if not os.path.isfile(path):
    raise JaxsegError(f"{path}: no such file (python -m experiments.export --format=onnx "
                      "writes it)")
  options = onnxruntime.SessionOptions()
  if threads:
    options.intra_op_num_threads = threads
  try:
    return onnxruntime.InferenceSession(path, options,
                                        providers=onnxruntime.get_available_providers())
  except Exception as e:  # pylint: disable=broad-except  # onnxruntime's errors vary
    raise JaxsegError(f"{path}: not an ONNX model onnxruntime can load (corrupt or truncated: "
                      f"{first_line(e)[:160]})") from None
