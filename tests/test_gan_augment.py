"""GAN augmentation: label-map perturbation, resumable pair generation, the experiment end to end."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxseg.data import SyntheticShapes, generated
from jaxseg.errors import JaxsegError
from jaxseg.studies import gan_augment
from jaxseg.train import gan_loop
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_paste_moves_a_donor_object_and_nothing_else():
  label = np.zeros((16, 16), np.uint8)
  label[:, 8:] = 1
  donor = np.zeros((16, 16), np.uint8)  # class 0 covers > half the map: not an object
  donor[2:6, 3:7] = 2  # the one object, 16 pixels
  out, pasted = gan_augment.paste_objects(label, donor, np.random.default_rng(3), max_objects=3)
  assert pasted == 1
  changed = out != label
  assert changed.any() and (out[changed] == 2).all() and set(np.unique(out)) <= {0, 1, 2}
  # The pasted pixels are the whole object, shifted: a 4x4 square somewhere in the map.
  ys, xs = np.nonzero(out == 2)
  assert (out == 2).sum() == 16 and ys.max() - ys.min() == 3 and xs.max() - xs.min() == 3
  # Objects cut by the donor's border, and blobs of the background class, are not taken.
  cut = np.zeros((16, 16), np.uint8)
  cut[0:4, 5:9] = 2
  assert gan_augment.paste_objects(label, cut, np.random.default_rng(3), max_objects=3)[1] == 0
  hole = np.ones((16, 16), np.uint8)
  hole[5:9, 5:9] = 0
  assert gan_augment.paste_objects(label, hole, np.random.default_rng(3), max_objects=3,
                                   background=0)[1] == 0
  assert gan_augment.paste_objects(label, hole, np.random.default_rng(3), max_objects=3)[1] == 1
  # Specks (below min_area) are not objects: nothing to paste.
  speck = np.zeros((16, 16), np.uint8)
  speck[0, 0] = 3
  same, none = gan_augment.paste_objects(label, speck, np.random.default_rng(0), max_objects=3,
                                         min_area=0.01)
  assert none == 0 and (same == label).all()


def test_label_maps_are_a_function_of_seed_and_index():
  source = SyntheticShapes("train", image_size=32, num_examples=20)
  a = gan_augment.label_map(source, 7, (32, 32), 0, perturbed=True, max_objects=3)
  b = gan_augment.label_map(source, 7, (32, 32), 0, perturbed=True, max_objects=3)
  plain = gan_augment.label_map(source, 7, (32, 32), 0, perturbed=False, max_objects=3)
  for x, y in zip(a[:2], b[:2]):
    np.testing.assert_array_equal(x, y)
  # A perturbed map is its plain map with objects pasted in: the same crop and real image.
  np.testing.assert_array_equal(a[1], plain[1])
  assert a[2] >= 1 and (a[0] != plain[0]).any()
  others = [gan_augment.label_map(source, i, (32, 32), 0, perturbed=False, max_objects=3)[0]
            for i in range(4)]
  assert len({o.tobytes() for o in others}) > 1


class _StandIn:
  """A generator stand-in: colours each label map and adds noise from the pair's key."""
  image_size, workdir, step, batch_size = (32, 32), "gan", 5, 4

  def draw(self, labels, keys):
    noise = np.stack([np.asarray(jax.random.randint(k, (32, 32, 3), 0, 40)) for k in keys])
    return (labels[..., None] * 40 + noise).astype(np.uint8)


def _config(num_pairs=10):
  from experiments.configs import gan_augment as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.get_config()
  config.augment.num_pairs = num_pairs
  config.gan.train.batch_size = 4
  return config


def _files(directory):
  return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*.png"))}


def test_interrupted_generation_continues_with_the_same_pairs(tmp_path, monkeypatch):
  source = SyntheticShapes("train", image_size=32, num_examples=20)
  whole = gan_augment.generate_pairs(_config(), _StandIn(), source, str(tmp_path / "whole"))
  assert len(generated.GeneratedPairs(str(tmp_path / "whole"))) == 10
  assert whole["num_perturbed"] == 5

  write, calls = generated.write_pairs, []

  def crash_on_the_third_batch(*args, **kwargs):
    calls.append(kwargs["start"])
    if len(calls) == 3:
      raise KeyboardInterrupt
    return write(*args, **kwargs)

  monkeypatch.setattr(generated, "write_pairs", crash_on_the_third_batch)
  with pytest.raises(KeyboardInterrupt):
    gan_augment.generate_pairs(_config(), _StandIn(), source, str(tmp_path / "cut"))
  assert len(generated.GeneratedPairs(str(tmp_path / "cut"))) == 8  # two batches of 4
  monkeypatch.setattr(generated, "write_pairs", write)
  gan_augment.generate_pairs(_config(), _StandIn(), source, str(tmp_path / "cut"))
  assert _files(tmp_path / "cut") == _files(tmp_path / "whole")

  with pytest.raises(JaxsegError, match=r"cut holds pairs generated with other settings .*"
                                        r"delete it to generate again"):
    gan_augment.generate_pairs(_config(num_pairs=12), _StandIn(), source, str(tmp_path / "cut"))


def test_a_drawn_pair_does_not_depend_on_the_others_drawn_with_it():
  """Resumed generation draws other batch companions (and padding): the bytes must not move."""
  from jaxseg.models import mask_gan  # pylint: disable=g-import-not-at-top
  from jaxseg.train import gan as gan_lib  # pylint: disable=g-import-not-at-top
  gan = gan_lib.GAN(
      "mask", mask_gan.MaskToImageGenerator(num_classes=3, ch=4, channels=(2, 1), z_dim=8,
                                            attention_resolution=8),
      mask_gan.PatchDiscriminator(num_classes=3, ch=8, num_downsamples=2), z_dim=8)
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, (6, 16, 16)).astype(np.uint8)
  example = {"image": np.zeros((6, 16, 16, 3), np.uint8), "label": labels.astype(np.int32)}
  g_tx, d_tx = gan_lib.make_optimizers()
  state = gan_lib.init_state(gan, example, jax.random.key(0), g_tx, d_tx)
  generator = gan_loop.Generator(gan, state, "gan", 0, (16, 16), batch_size=6)
  keys = [jax.random.fold_in(jax.random.key(1), i) for i in range(6)]
  whole = generator.draw(labels, keys)
  assert whole.shape == (6, 16, 16, 3) and whole.dtype == np.uint8
  np.testing.assert_array_equal(generator.draw(labels[2:5], keys[2:5]), whole[2:5])
  assert len({image.tobytes() for image in whole}) == 6  # each pair its own noise


def test_experiment_end_to_end(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.gan_augment", f"--workdir={tmp_path}",
       "--config.data.image_size=32", "--config.data.num_train_examples=12",
       "--config.gan.train.steps=2", "--config.gan.train.batch_size=4",
       "--config.gan.model.g_ch=8", "--config.gan.model.d_ch=8", "--config.gan.model.z_dim=8",
       "--config.gan.model.g_channels=2,1,1", "--config.gan.model.attention_resolution=16",
       "--config.gan.train.num_samples=4", "--config.gan.eval.num_images=8",
       "--config.gan.eval.kid_subsets=2", "--config.segmentation.train.steps=2",
       "--config.segmentation.train.batch_size=4", "--config.segmentation.model.features=4",
       "--config.segmentation.model.depth=2", "--config.segmentation.train.num_eval_examples=8",
       "--config.segmentation.train.num_prediction_images=2", "--config.augment.num_pairs=6",
       "--config.augment.seeds=(0,)"],
      cwd=ROOT, env=helpers.device_env(2), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["generated_pairs"] == 6 and summary["generated_from_perturbed_maps"] == 3
  assert summary["real_train_examples"] == 12 and summary["seeds"] == [0]
  real, both = summary["arms"]["real"], summary["arms"]["real+generated"]
  assert real["steps"] == both["steps"] == 2
  assert summary["miou_difference"]["mean"] == pytest.approx(
      both["miou"]["mean"] - real["miou"]["mean"])
  assert np.isfinite(summary["gan"]["fid"]) and summary["gan"]["steps"] == 2
  gan = json.loads((tmp_path / "gan" / "summary.json").read_text())
  assert gan["kind"] == "mask" and gan["fid_features"].startswith("random-convnet")
  assert (tmp_path / "gan" / "samples" / "step_000002.png").exists()
  # The augmented arm trained on the 12 real images + the 6 pairs; the real arm on the 12.
  config = json.loads((tmp_path / "real+generated_seed0" / "config.json").read_text())
  assert config["data"]["extra_train_dir"] == str(tmp_path / "generated")
  assert json.loads((tmp_path / "real_seed0" / "config.json").read_text())["data"][
      "extra_train_dir"] == ""
  pairs = generated.GeneratedPairs(str(tmp_path / "generated"))
  assert len(pairs) == 6 and pairs[0]["image"].shape == (32, 32, 3)
  for picture in ("generated_pairs.png", "per_class_iou.png", "gan/samples.png",
                  "real_seed0/predictions.png", "real+generated_seed0/predictions.png"):
    assert (tmp_path / picture).read_bytes()[:4] == b"\x89PNG", picture
