"""Training on your own data end to end: 4-band 16-bit TIFFs and grey binary scans through the
shared engine (statistics, class weights, resume, load_run, evaluate, predict), the superpixel
GNN on a folder dataset, and CamVid as a folder dataset scoring exactly as CamVid itself."""

import json
import os

import numpy as np
import pytest
import tifffile
from PIL import Image

from experiments.configs import superpixel_gnn as gnn_config
from experiments.configs import unet as unet_config
from jaxseg import evaluate, predict, runs
from jaxseg.data import from_config, stats, to_folder
from jaxseg.errors import JaxsegError
from jaxseg.train import graph, segmentation
from tests import helpers

H, W = 40, 48


def _scene(rng):
  """A mask of three classes (background, a rectangle, a bottom band) and its class map."""
  mask = np.zeros((H, W), np.uint8)
  y, x = rng.integers(2, 14, 2)
  mask[y:y + 14, x:x + 20] = 1
  mask[int(rng.integers(28, 34)):] = 2
  return mask


def write_tiffs(root, n=16):
  """4-band uint16 tiles whose bands carry the classes (plus noise), 12-bit like many sensors."""
  rng = np.random.default_rng(0)
  for kind in ("images", "masks"):
    os.makedirs(os.path.join(root, kind, "train"), exist_ok=True)
  for i in range(n):
    mask = _scene(rng)
    bands = rng.integers(0, 1500, (H, W, 4)).astype(np.uint16)
    bands[..., 0] += ((mask == 1) * 2000).astype(np.uint16)
    bands[..., 3] += ((mask == 2) * 2500).astype(np.uint16)
    planar = i % 2  # GDAL writes bands as planes, (C, H, W); others interleave them
    tifffile.imwrite(os.path.join(root, "images", "train", f"tile{i:02d}.tif"),
                     np.moveaxis(bands, -1, 0) if planar else bands, photometric="minisblack",
                     planarconfig="separate" if planar else "contig")
    Image.fromarray(mask).save(os.path.join(root, "masks", "train", f"tile{i:02d}.png"))
  with open(os.path.join(root, "classes.json"), "w") as f:
    json.dump({"names": ["background", "field", "water"],
               "palette": [[0, 0, 0], [0, 160, 0], [0, 0, 200]]}, f)
  return root


FOLDER = {"data.name": "folder", "data.crop_size": (32, 32), "data.val_fraction": 0.25,
          "train.eval_every": 2, "train.checkpoint_every": 2, "train.class_weights": "auto",
          "train.num_eval_examples": 0, "optim.schedule": "constant"}


@pytest.fixture(scope="module")
def four_band(tmp_path_factory):
  root = write_tiffs(str(tmp_path_factory.mktemp("tiles")))
  workdir = str(tmp_path_factory.mktemp("run"))
  config = helpers.tiny_config(steps=4, **FOLDER, **{"data.data_dir": root})
  return root, workdir, config, segmentation.train_and_evaluate(config, workdir)


def test_a_4_band_16_bit_run_normalises_by_its_own_statistics(four_band):
  root, workdir, config, summary = four_band
  assert summary["in_channels"] == 4 and summary["steps"] == 4
  with open(os.path.join(workdir, stats.CACHE_FILE)) as f:
    cached = json.load(f)
  train, _ = from_config.make_sources(config)
  assert cached["source"] == repr(train) and len(cached["mean"]) == 4
  assert 1000 < cached["mean"][0] < 2000  # 12-bit values, not squashed to 8 bits
  # train.class_weights="auto": Eigen & Fergus's weights of these statistics, as trained with.
  np.testing.assert_allclose(summary["class_weights"], stats.median_frequency_weights(cached))
  assert os.path.exists(os.path.join(workdir, "predictions.png"))
  run = runs.load_run(workdir)
  assert run.in_channels == 4
  kernel = run.variables["params"]["backbone"]["stem"]["conv"]["kernel"]
  assert kernel.shape[2] == 4


def test_load_run_and_evaluate_reproduce_the_logged_scores(four_band):
  _, workdir, config, summary = four_band
  model = runs.load_run(workdir, checkpoint="latest", weights="raw")
  source = from_config.make_source(config, "val")
  assert len(source) == 4
  result = evaluate.evaluate(model, source, batch_size=8)
  assert result.summary["miou"] == pytest.approx(summary["miou"], abs=1e-12)


def test_predict_writes_masks_of_a_tiff(four_band, tmp_path):
  root, workdir, _, _ = four_band
  model = evaluate.load_model([workdir], None)
  tile = os.path.join(root, "images", "train", "tile00.tif")
  written = predict.export_predictions(model, [tile], out_dir=str(tmp_path))
  labels = np.asarray(Image.open([w for w in written if w.endswith("_labels.png")][0]))
  assert labels.shape == (H, W) and labels.max() < 3
  grey = str(tmp_path / "grey.png")
  Image.fromarray(np.zeros((H, W), np.uint8)).save(grey)
  with pytest.raises(JaxsegError, match=r"grey\.png: image has 1 channel\(s\) of uint8 but "
                                        r"the model takes 4 of uint16"):
    predict.export_predictions(model, [grey], out_dir=str(tmp_path))
  # Three bands but 8-bit: not what the model was trained on (it would be normalised by the
  # 16-bit statistics), so not silently converted either.
  eight = str(tmp_path / "eight.tif")
  tifffile.imwrite(eight, np.zeros((H, W, 4), np.uint8), photometric="minisblack",
                   planarconfig="contig")
  with pytest.raises(JaxsegError, match=r"eight\.tif: image has 4 channel\(s\) of uint8 but "
                                        r"the model takes 4 of uint16"):
    predict.export_predictions(model, [eight], out_dir=str(tmp_path))


def test_a_resumed_run_on_folder_data_is_exact(four_band, tmp_path):
  _, _, config, summary = four_band
  first = config.copy_and_resolve_references()
  first.train.steps = 2
  workdir = str(tmp_path / "resumed")
  segmentation.train_and_evaluate(first, workdir)
  resumed = segmentation.train_and_evaluate(config, workdir)
  assert resumed["resumed_from"] == 2
  for key in ("miou", "pixel_accuracy", "class_weights"):
    assert resumed[key] == summary[key], key


@pytest.mark.parametrize("overrides, message", [
    ({"data.in_channels": 3}, r"--config.data.in_channels=3, but FolderDataset\(.*\) has "
                              r"4-channel uint16 images"),
    ({"data.normalize": "imagenet"}, r"--config.data.normalize=imagenet needs 8-bit RGB images"),
    ({"data.mean": (1.0, 2.0)}, r"--config.data.mean=\(1.0, 2.0\): give data.mean and data.std "
                                r"with one number per channel \(4\)"),
    ({"train.class_weights": "1,2"}, r"--config.train.class_weights has 2 numbers for 3 classes"),
])
def test_bad_settings_for_own_data_are_one_line(four_band, tmp_path, overrides, message):
  root = four_band[0]
  config = helpers.tiny_config(steps=1, **{**FOLDER, "data.data_dir": root, **overrides})
  with pytest.raises(JaxsegError, match=message) as error:
    segmentation.train_and_evaluate(config, str(tmp_path))
  assert "\n" not in str(error.value)


def test_a_grey_binary_unet_run(tmp_path):
  """1-channel 8-bit scans with 0/255 masks ("binary": true): a U-Net trains on them."""
  root = tmp_path / "scans"
  rng = np.random.default_rng(1)
  for kind in ("images", "masks"):
    os.makedirs(root / kind / "train")
  for i in range(10):
    mask = (_scene(rng) == 1).astype(np.uint8) * 255
    scan = np.clip(rng.normal(90, 20, (H, W)) + (mask > 0) * 60, 0, 255).astype(np.uint8)
    Image.fromarray(scan).save(root / "images" / "train" / f"s{i}.png")
    Image.fromarray(mask).save(root / "masks" / "train" / f"s{i}.png")
  (root / "classes.json").write_text(json.dumps({"names": ["tissue", "lesion"],
                                                 "binary": True}))
  config = unet_config.get_config()
  config.model.name, config.model.features, config.model.depth = "unet", 4, 2
  config.model.dtype = "float32"
  config.data.name, config.data.data_dir = "folder", str(root)
  config.data.crop_size, config.data.val_fraction = (32, 32), 0.2
  config.train.steps, config.train.batch_size, config.train.num_prediction_images = 2, 8, 2
  summary = segmentation.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["in_channels"] == 1 and summary["class_names"] == ["tissue", "lesion"]
  assert summary["eval_examples"] == 2
  assert runs.load_run(str(tmp_path / "run")).in_channels == 1


def _gnn_config(root, steps):
  config = gnn_config.get_config()
  config.data.name, config.data.data_dir, config.data.val_fraction = "folder", root, 0.25
  config.superpixels.n_segments = 16
  config.model.hidden, config.model.num_layers = 16, 2
  config.train.steps, config.train.batch_size = steps, 8
  config.train.num_eval_examples, config.train.num_prediction_images = 0, 2
  return config


def test_the_superpixel_gnn_trains_on_an_rgb_folder_dataset_and_refuses_bands(tmp_path):
  root = tmp_path / "rgb"
  rng = np.random.default_rng(2)
  colours = np.array([[40, 40, 40], [30, 180, 30], [30, 30, 200]], np.uint8)
  for kind in ("images", "masks"):
    os.makedirs(root / kind / "train")
  for i in range(8):
    mask = _scene(rng)
    image = np.clip(colours[mask] + rng.normal(0, 10, (H, W, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(root / "images" / "train" / f"p{i}.jpg", quality=95)
    Image.fromarray(mask).save(root / "masks" / "train" / f"p{i}.png")
  (root / "classes.json").write_text(json.dumps({"names": ["background", "field", "water"]}))
  summary = graph.train_and_evaluate(_gnn_config(str(root), 2), str(tmp_path / "gnn"))
  assert summary["steps"] == 2 and 0 <= summary["miou"] <= 1
  tiles = write_tiffs(str(tmp_path / "tiles"), n=4)
  with pytest.raises(JaxsegError, match="superpixel_gnn segments 8-bit RGB images"):
    graph.train_and_evaluate(_gnn_config(tiles, 2), str(tmp_path / "refused"))


def test_camvid_as_a_folder_dataset_trains_to_the_same_scores(tmp_path):
  """The real CamVid copy, rewritten as a folder dataset with colour-coded masks: the same
  run through --dataset=folder and --dataset=camvid logs the same losses and scores."""
  root = str(tmp_path / "camvid_folder")
  to_folder.export("camvid", root, data_dir=str(helpers.CAMVID), masks="colour")
  results = {}
  for name, data_dir in (("camvid", str(helpers.CAMVID)), ("folder", root)):
    config = helpers.tiny_config(steps=3, **{"data.name": name, "data.data_dir": data_dir,
                                             "data.crop_size": (48, 64),
                                             "train.num_eval_examples": 16})
    workdir = str(tmp_path / name)
    summary = segmentation.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    results[name] = (losses, summary)
  (camvid_losses, camvid), (folder_losses, mine) = results["camvid"], results["folder"]
  assert len(camvid_losses) == 3 and folder_losses == camvid_losses
  for key in ("miou", "pixel_accuracy", "mean_dice", "per_class_iou"):
    assert mine[key] == camvid[key], key


def test_the_gans_refuse_images_that_are_not_rgb_in_one_line(tmp_path):
  from experiments.configs import sagan as sagan_config  # pylint: disable=g-import-not-at-top
  from jaxseg.train import gan_loop  # pylint: disable=g-import-not-at-top
  config = sagan_config.get_config()
  config.data.name, config.data.data_dir = "folder", write_tiffs(str(tmp_path / "tiles"), n=4)
  config.data.val_fraction = 0.25
  with pytest.raises(JaxsegError, match=r"the GANs draw 8-bit RGB images; FolderDataset\(.*\) "
                                        r"has 4-channel uint16 ones"):
    gan_loop.train_and_evaluate(config, str(tmp_path / "gan"))
