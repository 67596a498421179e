"""Exports a trained run (or an ensemble) as serialised StableHLO that runs without jaxseg.

    python -m experiments.export --workdir=runs/unet_unet_synthetic --out=exported/unet
    python -m experiments.export --workdir=runs/a,runs/b --weights=2,1 --flip --out=exported/ab
    python -m experiments.export --workdir=runs/unet_unet_synthetic --format=safetensors --out=m

Writes OUT/model.stablehlo (and with --format=safetensors OUT/model.safetensors, the
portable model file) and OUT/model.json. Run it with jax and numpy only:
`jax.export.deserialize(bytearray(open("OUT/model.stablehlo", "rb").read())).call(images)`
gives (probabilities, labels) for uint8 images (B, H, W, C) of any size; docs/export.md.
"""

from absl import flags

from experiments import launch
from jaxseg import evaluate, export

_MODEL = launch.ModelFlags()
_OUT = flags.DEFINE_string("out", None, "Folder to write model.stablehlo and model.json to.",
                           required=True)
_FORMAT = flags.DEFINE_list("format", list(export.DEFAULT_FORMATS),
                            "What to write: stablehlo (runs with jax alone), safetensors (the "
                            "portable model file: jaxseg.load_pretrained, model.init_from).")


def main():
  model = evaluate.load_model(_MODEL.workdirs, _MODEL.weights(), _MODEL.loading())
  meta = export.export(model, _OUT.value, formats=_FORMAT.value, tta=_MODEL.tta())
  print(f"wrote {', '.join(meta['files'].values())} and {export.METADATA_FILE} to {_OUT.value} "
        f"({meta['model']}, {len(meta['class_names'])} classes, {meta['input']['size_rule']})")


if __name__ == "__main__":
  launch.run(main)
