"""jaxseg.predict.export_predictions and `python -m experiments.predict` on many files: names
that clash are told apart, a user's file is never replaced unasked, a rerun skips what is done,
a bad image is named while the rest are done, folders are walked, and an image far larger than
the training crops goes by sliding window."""

import dataclasses
import json
import logging
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from jaxseg import evaluate, portable, predict, runs, tiling
from jaxseg.data import SyntheticShapes
from jaxseg.errors import JaxsegError
from jaxseg.inference import TTA
from jaxseg.train import segmentation
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]
KINDS = ("labels", "mask", "overlay")


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("unet"))
  segmentation.train_and_evaluate(helpers.tiny_unet_config(), workdir)
  return workdir


@pytest.fixture(scope="module")
def model(unet_run):
  return runs.load_run(unet_run)


def _image(path, size=(32, 32), seed=0):
  """A synthetic picture (shapes on a background) saved at `path`; returns its pixels."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  image = SyntheticShapes("val", image_size=max(size), num_examples=1, seed=seed)[0]["image"]
  image = np.ascontiguousarray(image[:size[0], :size[1]])
  Image.fromarray(image).save(path, quality=95)
  return np.asarray(Image.open(path).convert("RGB"))  # what a JPEG decodes to


def _outputs(folder):
  """Every NAME_{labels,mask,overlay}.png under `folder`, and no temporary file left."""
  files = sorted(str(p) for p in pathlib.Path(folder).rglob("*.png")
                 if p.stem.endswith(tuple(f"_{k}" for k in KINDS)))
  assert not list(pathlib.Path(folder).rglob("*.tmp"))
  return files


def _labels(model, image, window=None):
  return np.asarray(model.probabilities(image[None], window=window)[0]).argmax(-1)


def test_names_that_clash_are_told_apart_and_the_count_is_the_files_on_disk(model, tmp_path):
  pixels = {name: _image(tmp_path / name, seed=i)
            for i, name in enumerate(["a/y.jpg", "a/y.png", "a/z.png"])}
  result = predict.export_predictions(model, [str(tmp_path / n) for n in pixels])
  # y.jpg and y.png keep their extension; z has no twin and keeps today's name.
  expected = {f"{tmp_path}/a/{base}_{kind}.png" for base in ("y.jpg", "y.png", "z")
              for kind in KINDS}
  assert set(result.written) == expected and _outputs(tmp_path) == sorted(expected)
  assert result.summary() == "wrote 9 files for 3 of 3 image(s)"
  for name in ("y.jpg", "y.png"):
    labels = np.asarray(Image.open(tmp_path / "a" / f"{name}_labels.png"))
    np.testing.assert_array_equal(labels, _labels(model, pixels[f"a/{name}"]))
  manifest = json.loads((tmp_path / "a" / predict.PREDICT_MANIFEST).read_text())
  assert sorted(manifest["outputs"]) == sorted(os.path.basename(p) for p in expected)
  assert manifest["outputs"]["y.png_mask.png"]["image"] == "y.png"

  # The same name in two folders, into one --out_dir: their folders are kept.
  _image(tmp_path / "b" / "x.jpg", seed=3)
  _image(tmp_path / "c" / "d" / "x.jpg", seed=4)
  plan = predict.plan_predictions([str(tmp_path / "b/x.jpg"), str(tmp_path / "c/d/x.jpg"),
                                    str(tmp_path / "a/z.png")], out_dir=str(tmp_path / "out"))
  assert [base for _, base in plan] == [f"{tmp_path}/out/b/x", f"{tmp_path}/out/c/d/x",
                                        f"{tmp_path}/out/z"]


def test_a_file_predict_did_not_write_is_refused_unless_overwrite(model, tmp_path):
  _image(tmp_path / "x.png")
  _image(tmp_path / "w.png", seed=1)
  out = tmp_path / "out"
  out.mkdir()
  (out / "x_mask.png").write_bytes(b"the user's own file")
  with pytest.raises(JaxsegError, match=rf"^{out}/x_mask\.png exists and predict did not write "
                                        r"it; pass --overwrite to replace it"):
    predict.export_predictions(model, [str(tmp_path / "w.png"), str(tmp_path / "x.png")],
                                out_dir=str(out))
  assert sorted(os.listdir(out)) == ["x_mask.png"]  # refused before anything was written
  result = predict.export_predictions(model, [str(tmp_path / "x.png")], out_dir=str(out),
                                       overwrite=True)
  assert len(result) == 3 and Image.open(out / "x_mask.png").size == (32, 32)
  # Now predict's own: a rerun with other settings replaces it without being asked.
  assert len(predict.export_predictions(model, [str(tmp_path / "x.png")], out_dir=str(out),
                                         alpha=0.2)) == 3


def test_a_rerun_skips_what_is_up_to_date_and_redoes_the_rest(model, tmp_path):
  paths = [str(tmp_path / f"{n}.png") for n in "abc"]
  for i, path in enumerate(paths):
    _image(path, seed=i)
  first = predict.export_predictions(model, paths, out_dir=str(tmp_path / "out"))
  assert len(first) == 9 and not first.skipped
  again = predict.export_predictions(model, paths, out_dir=str(tmp_path / "out"))
  assert (list(again), again.skipped) == ([], paths)
  assert again.summary() == ("wrote 0 files for 0 of 3 image(s), skipped 3 whose outputs were "
                             "up to date")
  os.remove(tmp_path / "out" / "b_overlay.png")
  made = os.stat(paths[2]).st_mtime_ns  # c.png changed after its mask was made:
  os.utime(tmp_path / "out" / "c_mask.png", ns=(made - 10**10,) * 2)
  resumed = predict.export_predictions(model, paths, out_dir=str(tmp_path / "out"))
  assert resumed.skipped == [paths[0]]
  assert sorted(resumed) == sorted(f"{tmp_path}/out/{n}_{k}.png" for n in "bc" for k in KINDS)
  assert len(_outputs(tmp_path / "out")) == 9
  # Outputs beside the images are not taken for images by a glob on the next run.
  beside = predict.export_predictions(model, [str(tmp_path / "a.png")])
  assert len(beside) == 3
  assert predict.plan_predictions([str(tmp_path / "*.png")]) == [
      (p, p[:-len(".png")]) for p in paths]


def test_a_bad_image_in_the_middle_is_named_and_the_rest_are_done(model, tmp_path, caplog):
  paths = [str(tmp_path / n) for n in ("a.png", "broken.png", "c.png")]
  _image(paths[0])
  pathlib.Path(paths[1]).write_bytes(b"not an image")
  _image(paths[2], seed=2)
  with caplog.at_level(logging.WARNING):
    with pytest.raises(predict.PredictionsFailed,
                       match=rf"^wrote 6 files for 2 of 3 image\(s\); 1 failed: {paths[1]}: "
                             r"not a readable image") as failed:
      predict.export_predictions(model, paths, out_dir=str(tmp_path / "out"))
  assert "\n" not in str(failed.value)
  assert sorted(failed.value.predictions.written) == _outputs(tmp_path / "out")
  assert len(_outputs(tmp_path / "out")) == 6
  assert [r.getMessage() for r in caplog.records if "broken.png" in r.getMessage()] == [
      f"predict: {failed.value.predictions.failed[0]}"]


def test_input_dir_is_walked_and_mirrored_and_sizes_are_batched(model, tmp_path, monkeypatch):
  sizes = {"a.png": (32, 32), "sub/b.jpg": (40, 48), "sub/deeper/c.tif": (32, 32),
           "sub/d.png": (40, 48), "sub/e.png": (32, 32)}
  pixels = {n: _image(tmp_path / "in" / n, size, seed=i)
            for i, (n, size) in enumerate(sizes.items())}
  (tmp_path / "in" / "notes.txt").write_text("not an image")
  (tmp_path / "in" / ".hidden.png").write_bytes(b"not an image")
  batches, probabilities = [], runs.Run.probabilities
  monkeypatch.setattr(runs.Run, "probabilities", lambda self, images, **kw: (
      batches.append(images.shape[:3]), probabilities(self, images, **kw))[1])
  result = predict.export_predictions(model, input_dir=str(tmp_path / "in"),
                                       out_dir=str(tmp_path / "out"), batch_size=2,
                                       bucket="yes")
  monkeypatch.undo()
  assert result.images == [str(tmp_path / "in" / n) for n in sorted(sizes)]
  # Sorted by bucket (32x32: a, c, e; 40x48 pads to 64x64: b, d), up to batch_size each, the
  # rows filled up to a multiple of the device count to shard them.
  rows = -(-2 // jax.device_count()) * jax.device_count()
  assert batches == [(rows, 32, 32), (1, 32, 32), (rows, 64, 64)]
  assert len(result) == 15 and len(_outputs(tmp_path / "out")) == 15
  for name, image in pixels.items():
    labels = np.asarray(Image.open(tmp_path / "out" / f"{os.path.splitext(name)[0]}_labels.png"))
    assert labels.shape == sizes[name]
    # Batched with others of its bucket, as alone at its bucket's size (padding zero after
    # normalisation), and mostly as alone at its own size (pixels near the padded edges see
    # the padding; this 2-step model is about the most sensitive there is).
    bucket = tuple(map(tiling.bucket_size, image.shape[:2]))
    padded = np.zeros((1, *bucket, 3), np.uint8)
    padded[0, :image.shape[0], :image.shape[1]] = image
    alone = np.asarray(model.probabilities(padded, sizes=np.array([image.shape[:2]])))
    np.testing.assert_array_equal(labels, alone[0, :image.shape[0], :image.shape[1]].argmax(-1))
    assert np.mean(labels == _labels(model, image)) > 0.9
  with pytest.raises(JaxsegError, match=r"^--input_dir=\S+/nowhere is not a folder$"):
    predict.export_predictions(model, input_dir=str(tmp_path / "nowhere"))
  with pytest.raises(JaxsegError, match=r"^\S+/in is a folder: pass --input_dir="):
    predict.export_predictions(model, [str(tmp_path / "in")])


def test_an_image_far_larger_than_the_training_crops_goes_by_sliding_window(model, tmp_path,
                                                                            caplog):
  big = [_image(tmp_path / f"big{i}.png", (100, 100), seed=i) for i in range(2)]
  with caplog.at_level(logging.INFO):
    predict.export_predictions(model, [str(tmp_path / f"big{i}.png") for i in range(2)])
  told = [r.getMessage() for r in caplog.records if "sliding window" in r.getMessage()]
  assert told == [f"predict: {tmp_path}/big0.png is 100x100, over twice the 32x32 images the "
                  "run trained on: images that large go by 32x32 sliding window (--window=0: "
                  "whole)"]
  for i, image in enumerate(big):
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / f"big{i}_labels.png")),
                                  _labels(model, image, window=(32, 32)))


def test_the_command_line_reports_failures_and_exits_non_zero(unet_run, tmp_path):
  _image(tmp_path / "in" / "a.png")
  _image(tmp_path / "in" / "sub" / "b.png", seed=1)
  (tmp_path / "in" / "sub" / "c.jpg").write_bytes(b"not an image")
  result = subprocess.run(
      [sys.executable, "-m", "experiments.predict", f"--workdir={unet_run}",
       f"--input_dir={tmp_path / 'in'}", f"--out_dir={tmp_path / 'out'}", "--batch_size=4"],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert result.returncode == 1, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1].startswith(
      f"error: wrote 6 files for 2 of 3 image(s); 1 failed: {tmp_path}/in/sub/c.jpg: ")
  assert len(_outputs(tmp_path / "out")) == 6
  assert (tmp_path / "out" / "sub" / "b_overlay.png").exists()


def test_auto_buckets_only_a_folder_of_many_sizes(model, tmp_path, monkeypatch, caplog):
  shapes, probabilities = [], runs.Run.probabilities
  monkeypatch.setattr(runs.Run, "probabilities", lambda self, images, **kw: (
      shapes.append(images.shape[1:3]), probabilities(self, images, **kw))[1])
  few = [(32, 32), (30, 27), (32, 32)]
  for i, size in enumerate(few):
    _image(tmp_path / "few" / f"{i}.png", size, seed=i)
  predict.export_predictions(model, input_dir=str(tmp_path / "few"))
  assert sorted(set(shapes)) == [(30, 27), (32, 32)]  # each size as it is
  shapes.clear()
  for i in range(predict.BUCKET_AFTER + 1):  # 9 sizes from 20x20 to 36x36
    _image(tmp_path / "many" / f"{i}.png", (20 + 2 * i, 20 + 2 * i), seed=i)
  with caplog.at_level(logging.INFO):
    predict.export_predictions(model, input_dir=str(tmp_path / "many"))
  assert sorted(set(shapes)) == [(32, 32), (64, 64)]
  assert any("9 image sizes, padded to 2 size buckets" in r.getMessage() for r in caplog.records)
  with pytest.raises(JaxsegError, match=r"^--bucket=maybe is not one of: auto, yes, no$"):
    predict.export_predictions(model, input_dir=str(tmp_path / "many"), bucket="maybe",
                               overwrite=True)


def test_bucket_sizes_are_few_and_pad_little():
  assert [tiling.bucket_size(n) for n in (1, 32, 33, 300, 511, 600, 1000, 1025, 6000)] == [
      32, 32, 64, 320, 512, 640, 1024, 1152, 6144]
  sizes = range(256, 4097)
  assert len({tiling.bucket_size(n) for n in sizes}) == 33  # not 3841 programs
  assert max(tiling.bucket_size(n) / n for n in sizes) <= 1 + 1 / 8


def test_one_device_and_eight_write_the_same_labels(unet_run, tmp_path):
  """Data-parallel prediction (a batch sharded over 8 devices) gives what one device gives."""
  paths = [str(tmp_path / "in" / f"{i}.png") for i in range(5)]
  for i, size in enumerate([(32, 32), (30, 27), (32, 32), (45, 50), (32, 32)]):
    _image(paths[i], size, seed=i)
  for devices in (1, 8):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.predict", f"--workdir={unet_run}",
         f"--out_dir={tmp_path / str(devices)}", "--batch_size=8", "--bucket=yes", *paths],
        cwd=ROOT,
        capture_output=True, text=True, timeout=600, env=helpers.device_env(devices))
    assert result.returncode == 0, result.stderr[-3000:]
  for i in range(len(paths)):
    one, eight = (np.asarray(Image.open(tmp_path / str(d) / f"{i}_labels.png")) for d in (1, 8))
    np.testing.assert_array_equal(one, eight)


def test_frozen_weights_predict_as_the_run_does(model):
  """Batch prediction on a CPU compiles the weights in as constants (Run.frozen)."""
  images = np.random.default_rng(7).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  frozen = model.frozen()
  assert frozen.constant_weights and not model.constant_weights
  # pylint: disable-next=protected-access
  lowered = frozen._probabilities.lower(images, tta=TTA(), window=None, sizes=None)
  assert len(jax.tree.leaves(lowered.args_info)) == 1  # the images only: no weight arguments
  np.testing.assert_allclose(frozen.probabilities(images), model.probabilities(images),
                             atol=1e-5)


def test_a_portable_model_file_predicts_from_the_command_line(model, tmp_path):
  portable.save_pretrained(model, str(tmp_path / "model.safetensors"))
  image = _image(tmp_path / "x.png", (32, 32))
  result = subprocess.run([sys.executable, "-m", "experiments.predict",
                           f"--workdir={tmp_path / 'model.safetensors'}",
                           str(tmp_path / "x.png")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "x_labels.png")),
                                _labels(model, image))


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_tiled_labels_are_the_sliding_window_labels(model, batch_size):
  """Bands of windows, `batch_size` windows at a time over 8 devices, give what the whole-image
  sliding window gives, for a run and for a weighted ensemble of two."""
  image = np.random.default_rng(8).integers(0, 256, (70, 90, 3), dtype=np.uint8)
  other = dataclasses.replace(model, variables=jax.tree.map(lambda v: v * 1.1, model.variables))
  for members, weights in (([model], [1.0]), ([model, other], [0.25, 0.75])):
    expected = evaluate.Ensemble(members, weights).probabilities(image[None], window=(32, 24))
    labels = tiling.tiled_labels(members, weights, image, (32, 24), batch_size=batch_size)
    assert labels.dtype == np.uint8 and labels.shape == (70, 90)
    assert np.mean(labels == np.asarray(expected[0]).argmax(-1)) >= 0.9999
