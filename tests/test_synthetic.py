"""Tests for the procedural SyntheticShapes data source (numpy + PIL only, no jax)."""
import hashlib
import pickle

import grain.python as grain
import numpy as np
import pytest
from PIL import Image, ImageDraw

from jaxseg.data.synthetic import SyntheticShapes

# Small images keep the statistical tests to a fraction of a second.
SIZE = 64
NUM_STATS = 200


def _digest(example) -> str:
  return hashlib.sha256(example["image"].tobytes() + example["label"].tobytes()).hexdigest()


@pytest.fixture(scope="module")
def rendered():
  """(image, label, objects) for the first NUM_STATS training examples."""
  ds = SyntheticShapes("train", image_size=SIZE)
  return [ds._render(i) for i in range(NUM_STATS)]


def test_same_key_gives_same_bytes_in_any_order():
  a = SyntheticShapes("train", image_size=SIZE, seed=3)
  b = SyntheticShapes("train", image_size=SIZE, seed=3)
  order = [5, 0, 17, 5, 99_999]
  forward = [_digest(a[i]) for i in order]
  backward = [_digest(b[i]) for i in reversed(order)][::-1]
  assert forward == backward
  assert forward[0] == forward[3]  # re-reading an index in one instance changes nothing
  assert _digest(a[np.int64(17)]) == forward[2]  # numpy integer indices, as samplers yield


def test_seeds_and_splits_give_different_examples():
  base = _digest(SyntheticShapes("train", image_size=SIZE, seed=0)[0])
  assert _digest(SyntheticShapes("train", image_size=SIZE, seed=1)[0]) != base
  assert _digest(SyntheticShapes("val", image_size=SIZE, seed=0)[0]) != base
  assert _digest(SyntheticShapes("test", image_size=SIZE, seed=0)[0]) != base


def test_splits_are_disjoint():
  digests = {
      split: {_digest(SyntheticShapes(split, image_size=SIZE)[i]) for i in range(48)}
      for split in ("train", "val", "test")
  }
  assert all(len(d) == 48 for d in digests.values())  # no repeats inside a split either
  assert not digests["train"] & digests["val"]
  assert not digests["train"] & digests["test"]
  assert not digests["val"] & digests["test"]


@pytest.mark.parametrize("image_size, hw", [(SIZE, (SIZE, SIZE)), ((48, 80), (48, 80))])
def test_shapes_dtypes_and_label_range(image_size, hw):
  ds = SyntheticShapes("val", image_size=image_size)
  assert ds.image_size == hw
  for i in range(8):
    ex = ds[i]
    assert set(ex) == {"image", "label"}
    assert ex["image"].shape == (*hw, 3) and ex["image"].dtype == np.uint8
    assert ex["label"].shape == hw and ex["label"].dtype == np.uint8
    assert ex["label"].max() < ds.num_classes
    assert ex["image"].flags.writeable  # downstream augmentations may work in place


def test_lengths_and_class_metadata():
  assert len(SyntheticShapes("train")) == 100_000
  assert len(SyntheticShapes("val")) == len(SyntheticShapes("test")) == 64
  assert len(SyntheticShapes("val", num_examples=5)) == 5
  ds = SyntheticShapes()
  assert ds.class_names[0] == "background" and ds.num_classes == len(ds.class_names) == 5
  assert ds.palette.shape == (5, 3) and ds.palette.dtype == np.uint8
  assert len({tuple(c) for c in ds.palette}) == 5
  assert ds.ignore_index == 255


def test_class_balance_and_object_fraction(rendered):
  labels = np.stack([label for _, label, _ in rendered])
  present = np.stack([(labels == k).any(axis=(1, 2)) for k in range(1, 5)], axis=1)
  # With 1..4 objects of uniformly drawn classes, a class is in ~49% of images before occlusion.
  assert present.mean(0).min() > 0.3, present.mean(0)
  object_pixels = np.bincount(labels.ravel(), minlength=5)[1:]
  assert (object_pixels / object_pixels.sum()).min() > 0.15  # outlines have similar areas
  fraction = (labels > 0).mean()
  assert 0.10 < fraction < 0.60, fraction
  assert (labels > 0).any(axis=(1, 2)).mean() > 0.95  # almost no image is all background


def test_colour_carries_no_class_information(rendered):
  # One sample per (image, class present): the mean RGB over that class's pixels.
  feats, classes = [], []
  for image, label, _ in rendered:
    for k in np.unique(label[label > 0]):
      feats.append(image[label == k].mean(0))
      classes.append(k)
  feats, classes = np.array(feats), np.array(classes)
  # (a) Class means agree within 4 standard errors of their difference (z-test, 18 comparisons):
  # colours are uniform in RGB for every class, so only sampling noise separates them.
  means = np.stack([feats[classes == k].mean(0) for k in range(1, 5)])
  sems = np.stack([feats[classes == k].std(0) / np.sqrt((classes == k).sum()) for k in range(1, 5)])
  for a in range(4):
    for b in range(a + 1, 4):
      assert np.all(np.abs(means[a] - means[b]) < 4 * np.hypot(sems[a], sems[b])), (a, b, means)
  # (b) A leave-one-out 9-NN classifier on colour alone stays near chance (25%); with ~400
  # samples its accuracy has a standard deviation of ~2%, so 35% is far outside chance.
  d = np.linalg.norm(feats[:, None] - feats[None], axis=-1)
  np.fill_diagonal(d, np.inf)
  votes = classes[np.argsort(d, axis=1)[:, :9]]
  predicted = np.array([np.bincount(v, minlength=5).argmax() for v in votes])
  assert (predicted == classes).mean() < 0.35


def test_label_follows_drawing_order_and_occlusion(rendered):
  overlapping = 0
  for image, label, objects in rendered[:60]:
    expected = np.zeros(label.shape, np.uint8)
    coverage = np.zeros(label.shape, np.int32)
    for cls, poly in objects:
      mask_img = Image.new("L", label.shape[::-1], 0)
      ImageDraw.Draw(mask_img).polygon(poly.ravel().tolist(), fill=1)
      mask = np.asarray(mask_img).astype(bool)
      expected[mask] = cls  # the later object wins
      coverage += mask
    np.testing.assert_array_equal(label, expected)
    overlapping += (coverage >= 2).sum() > 20
  assert overlapping >= 5, overlapping


def test_objects_stand_out_from_the_background(rendered):
  # Mean colour inside objects vs. a ring of background just outside: a learnable task
  # needs visible edges. Compared on whole-image means, so textures can still blur it locally.
  gaps = []
  for image, label, _ in rendered[:60]:
    fg = label > 0
    if fg.all() or not fg.any():
      continue
    gaps.append(np.linalg.norm(image[fg].mean(0) - image[~fg].mean(0)))
  assert np.median(gaps) > 20


def test_repr_is_stable_and_made_of_constructor_args():
  ds = SyntheticShapes("val", image_size=(32, 48), num_examples=4, seed=7, max_objects=3,
                       preset="hard")
  expected = ("SyntheticShapes(split='val', image_size=(32, 48), num_examples=4, seed=7, "
              "max_objects=3, preset='hard')")
  assert repr(ds) == expected
  ds[0]
  assert repr(ds) == expected  # reading does not change it
  assert repr(SyntheticShapes("val", image_size=(32, 48), num_examples=4, seed=7,
                              max_objects=3, preset="hard")) == expected


def test_grain_map_dataset_and_data_loader():
  source = SyntheticShapes("val", image_size=32, num_examples=4)
  direct = [_digest(source[i]) for i in range(4)]
  assert isinstance(source, grain.RandomAccessDataSource)
  assert [_digest(ex) for ex in grain.MapDataset.source(source)] == direct
  sampler = grain.IndexSampler(num_records=4, shard_options=grain.NoSharding(), shuffle=True,
                               num_epochs=1, seed=0)
  loader = grain.DataLoader(data_source=source, sampler=sampler, worker_count=0)
  assert sorted(_digest(ex) for ex in loader) == sorted(direct)
  # Worker processes receive the source pickled.
  assert _digest(pickle.loads(pickle.dumps(source))[2]) == direct[2]


def test_errors():
  with pytest.raises(ValueError, match="valid splits: train, val, test"):
    SyntheticShapes("validation")
  ds = SyntheticShapes("val", num_examples=3, image_size=16)
  for bad in (3, -1):
    with pytest.raises(IndexError):
      ds[bad]


def test_presets_default_is_upright_hard_is_rotated():
  upright = SyntheticShapes("train", image_size=64)
  rotated = SyntheticShapes("train", image_size=64, preset="hard")

  def rectangle_edges_axis_aligned(ds):
    aligned = []
    for i in range(40):
      for cls, poly in ds._render(i)[2]:
        if cls == 2:  # rectangle: every edge horizontal or vertical when upright
          d = np.diff(np.vstack([poly, poly[:1]]), axis=0)
          aligned.append(bool(np.all(np.isclose(d, 0, atol=1e-6).any(axis=1))))
    return aligned

  assert all(rectangle_edges_axis_aligned(upright))
  assert not any(rectangle_edges_axis_aligned(rotated))
  assert upright.max_objects == 3 and rotated.max_objects == 4
  with pytest.raises(ValueError, match="valid presets: default, hard"):
    SyntheticShapes("train", preset="easy")
