"""Segments image files with a trained run (or an ensemble).

    python -m experiments.predict --workdir=runs/deeplab_resnet101_camvid street1.jpg street2.png
    python -m experiments.predict --workdir=runs/a,runs/b --tta --out_dir=masks photos/*.jpg

For each IMAGE writes IMAGE's name + _labels.png (class ids, 8-bit grey: what a program
reads), _mask.png (the dataset's colours) and _overlay.png (the mask over the image), next to
the image unless --out_dir says otherwise. Images of any size: larger than the training crops
they are run whole, or by sliding window where the run's dataset evaluates that way (--window).
"""

from absl import flags

from experiments import launch
from jaxseg import evaluate

_MODEL = launch.ModelFlags()
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where to write (default: beside each image).")
_ALPHA = flags.DEFINE_float("alpha", 0.5, "Opacity of the mask in the overlay.")


def main(images):
  model = evaluate.load_model(_MODEL.workdirs, _MODEL.weights(), _MODEL.loading())
  written = evaluate.export_predictions(model, images, out_dir=_OUT_DIR.value,
                                        tta=_MODEL.tta(), window=_MODEL.window(),
                                        alpha=_ALPHA.value)
  print(f"wrote {len(written)} files for {len(images)} image(s), e.g. {written[0]}")


if __name__ == "__main__":
  launch.run(main, positional=True)
