"""Augmentation keeps image and label aligned, resamples labels nearest-neighbour only, pads
with ignore_index, and is a pure function of the seed; sliding-window evaluation covers every
pixel and equals whole-image inference for a per-pixel model."""

import numpy as np
import pytest

from jaxseg.data import pipeline, transforms

PALETTE = np.array([[250, 0, 0], [0, 250, 0], [0, 0, 250], [250, 250, 0]], np.uint8)


def _blocks(h=60, w=80):
  """Label of 4 big rectangles and an image painted in each class's colour."""
  label = np.zeros((h, w), np.uint8)
  label[:, w // 2:] = 1
  label[h // 2:, :w // 3] = 2
  label[h // 3:h // 2, w // 3:] = 3
  return {"image": PALETTE[label], "label": label}


@pytest.mark.parametrize("scale, offset", [(1.0, (0.0, 0.0)), (1.7, (0.3, 0.9)),
                                           (0.5, (0.5, 0.5)), (0.31, (1.0, 1.0))])
def test_scale_crop_keeps_image_and_label_aligned(scale, offset):
  example = _blocks()
  image, label = transforms.scale_crop(example["image"], example["label"], scale, (40, 48),
                                       offset, 255)
  assert image.shape == (40, 48, 3) and label.shape == (40, 48)
  assert set(np.unique(label)) <= {0, 1, 2, 3, 255}  # nearest: no invented ids
  inside = label != 255
  # Away from edges (bilinear blends colours across a boundary), each pixel has its class's
  # colour; padding is black image and ignore label.
  # Downscaling antialiases over a few pixels, so at 0.31 a third of this tiny crop is edge.
  exact = np.all(image == PALETTE[np.where(inside, label, 0)], axis=-1) & inside
  assert exact.sum() >= (0.8 if scale >= 0.5 else 0.6) * inside.sum()
  for c in np.unique(label[inside]):  # each class's pixels are on average its own colour
    mean = image[label == c].mean(0)
    assert np.argmin(np.linalg.norm(PALETTE - mean, axis=1)) == c
  assert np.all(image[~inside] == 0)
  if scale * 60 < 40:
    assert (~inside).any()  # smaller than the crop: padded


def test_scale_one_at_origin_is_a_plain_crop():
  example = _blocks()
  image, label = transforms.scale_crop(example["image"], example["label"], 1.0, (40, 48),
                                       (0.0, 0.0), 255)
  np.testing.assert_array_equal(image, example["image"][:40, :48])
  np.testing.assert_array_equal(label, example["label"][:40, :48])


def test_augment_is_deterministic_for_a_seed_and_varies_over_seeds():
  augment = transforms.Augment((32, 32), 0.5, 2.0)
  example = _blocks()
  a = augment.random_map(example, np.random.default_rng(7))
  b = augment.random_map(example, np.random.default_rng(7))
  c = augment.random_map(example, np.random.default_rng(8))
  for key in ("image", "label"):
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["image"], c["image"])
  assert a["image"].dtype == np.uint8 and a["label"].dtype == np.uint8


def test_flip_mirrors_both():
  augment = transforms.Augment((60, 80), 1.0, 1.0, flip=True, brightness=0, contrast=0,
                               saturation=0, hue=0)
  example = _blocks()
  flipped = 0
  for seed in range(8):
    out = augment.random_map(example, np.random.default_rng(seed))
    if not np.array_equal(out["label"], example["label"]):
      np.testing.assert_array_equal(out["label"], example["label"][:, ::-1])
      np.testing.assert_array_equal(out["image"], example["image"][:, ::-1])
      flipped += 1
  assert 0 < flipped < 8


def test_photometric_jitter_leaves_labels_alone_and_changes_colours():
  augment = transforms.Augment((60, 80), 1.0, 1.0, flip=False)
  example = _blocks()
  outs = [augment.random_map(example, np.random.default_rng(s)) for s in range(6)]
  assert all(np.array_equal(o["label"], example["label"]) for o in outs)
  assert any(not np.array_equal(o["image"], example["image"]) for o in outs)


def test_augmented_loader_is_reproducible():
  source = [_blocks() for _ in range(6)]

  class Source:
    def __len__(self):
      return len(source)

    def __getitem__(self, i):
      return source[i]

    def __repr__(self):
      return "Blocks()"

  def first(seed):
    loader = pipeline.train_loader(Source(), batch_size=2, seed=seed,
                                   operations=[transforms.Augment((24, 24))])
    return next(iter(loader))

  np.testing.assert_array_equal(first(3)["image"], first(3)["image"])
  assert not np.array_equal(first(3)["image"], first(4)["image"])


def test_pad_to_marks_padding_ignored():
  example = {**_blocks(30, 40), "name": "x"}
  out = transforms.PadTo((32, 48)).map(example)
  assert out["image"].shape == (32, 48, 3)
  assert np.all(out["label"][30:] == 255) and np.all(out["label"][:, 40:] == 255)
  with pytest.raises(ValueError, match=r"x is 30x40 \(HxW\), larger than the evaluation canvas"):
    transforms.PadTo((16, 48)).map(example)


class _Draws:
  """A generator stand-in returning the given draws in order (random() and uniform())."""

  def __init__(self, *draws):
    self.draws = list(draws)

  def random(self):
    return self.draws.pop(0)

  def uniform(self, low, high):
    return self.draws.pop(0)


JITTER = dict(brightness=32, contrast=0.5, saturation=0.5, hue=18)


def test_jitter_ops_do_what_they_say():
  image = np.random.default_rng(0).integers(0, 256, (16, 20, 3), dtype=np.uint8)
  # Draws: (apply?, amount) for brightness, contrast, saturation, hue; 0.9 = skip.
  brighter = transforms.photometric(image, _Draws(0.1, 20.0, 0.9, 0.9, 0.9), **JITTER)
  np.testing.assert_array_equal(brighter, np.clip(image.astype(int) + 20, 0, 255))
  contrast = transforms.photometric(image, _Draws(0.9, 0.1, 1.4, 0.9, 0.9), **JITTER)
  np.testing.assert_allclose(contrast, np.clip(image * 1.4, 0, 255), atol=1)
  grey = transforms.photometric(image, _Draws(0.9, 0.9, 0.1, 0.0, 0.9), **JITTER)
  luma = image @ np.array([0.299, 0.587, 0.114])
  np.testing.assert_allclose(grey, np.repeat(luma[..., None], 3, -1), atol=1)
  # A hue turn keeps luma (up to clipping and rounding) and moves the colours.
  turned = transforms.photometric(image, _Draws(0.9, 0.9, 0.9, 0.1, 18.0), **JITTER)
  unclipped = (turned > 0).all(-1) & (turned < 255).all(-1)
  np.testing.assert_allclose((turned @ np.array([0.299, 0.587, 0.114]))[unclipped],
                             luma[unclipped], atol=1.5)
  assert np.abs(turned.astype(int) - image).max() > 10
  assert transforms.photometric(image, _Draws(0.9, 0.9, 0.9, 0.9), **JITTER) is image
