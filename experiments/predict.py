"""Segments image files with a trained run.

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
from jaxseg.data import from_config
from jaxseg.inference import DEFAULT_TTA, NO_TTA

_WORKDIR = flags.DEFINE_list("workdir", None, "Run directory, or several (comma-separated) for "
                             "an ensemble.", required=True)
_WEIGHTS = flags.DEFINE_list("weights", None, "Ensemble weights, one per run (default equal).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where to write (default: beside each image).")
_TTA = flags.DEFINE_bool("tta", False, "Test-time augmentation: scales 0.5-1.75 and flips.")
_WINDOW = flags.DEFINE_string("window", None, "Sliding window HxW, or 0 for whole images "
                              "(default: the run's dataset's evaluation setting).")
_ALPHA = flags.DEFINE_float("alpha", 0.5, "Opacity of the mask in the overlay.")


def main(images):
  weights = [float(w) for w in _WEIGHTS.value] if _WEIGHTS.value else None
  model = evaluate.load_model(_WORKDIR.value, weights)
  window = evaluate.parse_window(_WINDOW.value)
  if window == "default":
    first = model.members[0] if isinstance(model, evaluate.Ensemble) else model
    window, _ = from_config.eval_settings(first.config, model.classes.ignore_index)
  written = evaluate.export_predictions(model, images, out_dir=_OUT_DIR.value,
                                        tta=DEFAULT_TTA if _TTA.value else NO_TTA,
                                        window=window, alpha=_ALPHA.value)
  print(f"wrote {len(written)} files for {len(images)} image(s), e.g. {written[0]}")


if __name__ == "__main__":
  launch.run(main, positional=True)
