"""Segments image files with a trained run (or an ensemble).

    python -m experiments.predict --workdir=runs/deeplab_resnet101_camvid street1.jpg street2.png
    python -m experiments.predict --workdir=runs/a,runs/b --tta --out_dir=masks 'photos/*.jpg'
    python -m experiments.predict --workdir=runs/deeplab_resnet101_camvid --input_dir=survey \
        --out_dir=survey_masks

For each IMAGE writes IMAGE's name + _labels.png (class ids, 8-bit grey: what a program
reads), _mask.png (the dataset's colours) and _overlay.png (the mask over the image), next to
the image unless --out_dir says otherwise (--input_dir's subfolders are kept under it). Images
that share a name get their extension, then their folder, in the output name
(docs/evaluation.md). A file predict did not write is never replaced without --overwrite;
images whose outputs are up to date are skipped, so a rerun finishes a killed one. A bad image
is named and the rest are done; the exit status is then 1. Images of any size: larger than
the training crops they are run whole, or by sliding window where the run's dataset evaluates
that way; over twice the training size, by windows of that size (--window overrides).
"""

from absl import flags

from experiments import launch
from jaxseg import evaluate, predict

_MODEL = launch.ModelFlags()
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where to write (default: beside each image).")
_INPUT_DIR = flags.DEFINE_string(
    "input_dir", None, "Also predict every image (" + " ".join(predict.IMAGE_SUFFIXES) +
    ") under this folder, recursively; --out_dir keeps its subfolders.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing output files that "
                               "predict did not write.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Images predicted together, sharded over "
                                   "every device.", lower_bound=1)
_BUCKET = flags.DEFINE_enum("bucket", "auto", predict.BUCKETS, "yes: pad each image to a size "
                            "bucket (at most 1/8 more per side, zero after normalisation) so "
                            "that a folder of many sizes compiles a few programs; auto: when "
                            f"more than {predict.BUCKET_AFTER} sizes; no: each size as it is.")
_ALPHA = flags.DEFINE_float("alpha", 0.5, "Opacity of the mask in the overlay.")


def main(images):
  # Checked before a run is restored (which can take a while): a typo in a path, or a file
  # in the way, is reported at once.
  predict.plan_predictions(images, out_dir=_OUT_DIR.value, input_dir=_INPUT_DIR.value,
                            overwrite=_OVERWRITE.value)
  tta, window = _MODEL.tta(), _MODEL.window()
  model = evaluate.load_model(_MODEL.workdirs, _MODEL.weights(), _MODEL.loading())
  # A failure raises PredictionsFailed (launch.run prints its one-line summary, exit 1).
  result = predict.export_predictions(model, images, out_dir=_OUT_DIR.value, tta=tta,
                                       window=window,
                                       alpha=_ALPHA.value, input_dir=_INPUT_DIR.value,
                                       overwrite=_OVERWRITE.value, batch_size=_BATCH_SIZE.value,
                                       bucket=_BUCKET.value)
  print(result.summary() + (f", e.g. {result.written[0]}" if result.written else ""))


if __name__ == "__main__":
  launch.run(main, positional=True)
