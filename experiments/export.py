"""Exports a trained run (or an ensemble) as serialised StableHLO and ONNX that run without
jaxseg.

    python -m experiments.export --workdir=runs/unet_unet_synthetic --out=exported/unet
    python -m experiments.export --workdir=runs/unet_unet_synthetic --format=stablehlo,onnx \
        --size=256x256 --out=exported/unet
    python -m experiments.export --workdir=runs/a,runs/b --weights=2,1 --flip --out=exported/ab
    python -m experiments.export --workdir=runs/unet_unet_synthetic --format=safetensors --out=m

Writes OUT/model.stablehlo, OUT/model.onnx with --format=onnx (onnxruntime; a fixed --size,
by default the training size; needs `pip install 'jaxseg[export]'`), OUT/model.safetensors with
--format=safetensors (the portable model file) and OUT/model.json. Run it with jax and numpy only:
`jax.export.deserialize(bytearray(open("OUT/model.stablehlo", "rb").read())).call(images)`
gives (probabilities, labels) for uint8 images (B, H, W, C) of any size; docs/export.md.
"""

from absl import flags

from experiments import launch
from jaxseg import evaluate, export
from jaxseg.errors import JaxsegError

_MODEL = launch.ModelFlags()
_OUT = flags.DEFINE_string("out", None, "Folder to write model.stablehlo and model.json to.",
                           required=True)
_FORMAT = flags.DEFINE_list("format", list(export.DEFAULT_FORMATS),
                            "What to write: stablehlo (runs with jax alone), safetensors (the "
                            "portable model file: jaxseg.load_pretrained, model.init_from), onnx "
                            "(onnxruntime; a fixed --size).")
_SIZE = flags.DEFINE_string("size", None, "HxW (or N for NxN) of the images model.onnx takes; "
                            "default: the run's training size. model.stablehlo takes any size.")


def _size():
  if _SIZE.value is None:
    return None
  try:
    size = tuple(int(v) for v in _SIZE.value.lower().split("x"))
  except ValueError:
    raise JaxsegError(f"--size={_SIZE.value}: give HxW, e.g. 512x512") from None
  return size * 2 if len(size) == 1 else size


def main():
  model = evaluate.load_model(_MODEL.workdirs, _MODEL.weights(), _MODEL.loading())
  meta = export.export(model, _OUT.value, formats=_FORMAT.value, tta=_MODEL.tta(),
                       size=_size())
  onnx = f"; model.onnx: {meta['onnx']['size_rule']}" if "onnx" in meta else ""
  print(f"wrote {', '.join(meta['files'].values())} and {export.METADATA_FILE} to {_OUT.value} "
        f"({meta['model']}, {len(meta['class_names'])} classes, {meta['input']['size_rule']}"
        f"{onnx})")


if __name__ == "__main__":
  launch.run(main)
