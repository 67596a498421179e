"""Training augmentation on the host: random scale, crop (padding with `ignore_index`), flip,
photometric jitter (8-bit RGB only); and padding for evaluation. Images of any channel count
and dtype keep both.

Image and label go through the same geometry; labels are only ever resampled
nearest-neighbour, so no invented class ids appear on boundaries. Every random draw comes from
the generator grain hands to a RandomMapTransform, which grain derives from the loader's seed
and the record's position: the same seed gives the same crops in any worker and after a resume.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain.python as grain
import numpy as np
from PIL import Image

from jaxseg.errors import JaxsegError


def scale_crop(image: np.ndarray, label: np.ndarray, scale: float, crop: tuple[int, int],
               offset: tuple[float, float], ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
  """The `crop` window of the image resized by `scale`, padded with `ignore_index` labels
  (and zero pixels) where the scaled image is smaller than the window.

  `offset` in [0, 1]^2 places the window within the scaled image. Only the window is resampled
  (PIL's `box`), so scaling a 2048x1024 image by 2 costs a crop, not a 4096x2048 resize.
  """
  h, w = label.shape
  ch, cw = crop
  sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
  y0 = int(offset[0] * (max(sh - ch, 0) + 1) * 0.999999)
  x0 = int(offset[1] * (max(sw - cw, 0) + 1) * 0.999999)
  wh, ww = min(ch, sh - y0), min(cw, sw - x0)
  fy, fx = h / sh, w / sw  # source pixels per scaled pixel
  box = (x0 * fx, y0 * fy, (x0 + ww) * fx, (y0 + wh) * fy)
  out_image = np.zeros((ch, cw, image.shape[-1]), image.dtype)
  out_label = np.full((ch, cw), ignore_index, np.uint8)
  out_image[:wh, :ww] = resize_image(image, (ww, wh), box)
  out_label[:wh, :ww] = np.asarray(
      Image.fromarray(label).resize((ww, wh), Image.NEAREST, box=box))
  return out_image, out_label


def resize_image(image: np.ndarray, size: tuple[int, int], box) -> np.ndarray:
  """Bilinear resize of `box` (PIL's) of an (H, W, C) image to `size` (w, h), in its dtype.

  8-bit RGB goes through PIL in one pass; anything else (1 or 4+ bands, 16-bit, float) band
  by band in PIL's float mode, rounded back for integer dtypes, so a 16-bit tile keeps its
  16 bits and a float one its values.
  """
  if image.dtype == np.uint8 and image.shape[-1] == 3:
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR, box=box))
  bands = [np.asarray(Image.fromarray(np.asarray(image[..., c], np.float32), "F")
                      .resize(size, Image.BILINEAR, box=box)) for c in range(image.shape[-1])]
  out = np.stack(bands, axis=-1)
  if np.issubdtype(image.dtype, np.integer):
    info = np.iinfo(image.dtype)
    out = np.clip(np.round(out), info.min, info.max)
  return out.astype(image.dtype)


# RGB <-> YIQ (NTSC): hue is an angle in the I-Q plane, Y (luma) stays.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                        [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def colour_matrix(rng: np.random.Generator, *, brightness: float, contrast: float,
                  saturation: float, hue: float) -> np.ndarray | None:
  """mmsegmentation's PhotoMetricDistortion as one affine colour map (3, 4), or None.

  Brightness shift, contrast scale, saturation (blend with luma) and hue rotation (in the YIQ
  plane), each drawn with probability 1/2 and in that order, are all linear in RGB: composing
  them costs one pass over the pixels instead of four plus two HSV conversions (which made
  jitter the slowest step of the pipeline at 512x1024).
  """
  matrix, offset, changed = np.eye(3), np.zeros(3), False
  if brightness and rng.random() < 0.5:
    offset += rng.uniform(-brightness, brightness)
    changed = True
  if contrast and rng.random() < 0.5:
    a = rng.uniform(1 - contrast, 1 + contrast)
    matrix, offset, changed = a * matrix, a * offset, True
  if saturation and rng.random() < 0.5:
    s = rng.uniform(1 - saturation, 1 + saturation)
    blend = s * np.eye(3) + (1 - s) * np.outer(np.ones(3), _RGB_TO_YIQ[0])
    matrix, offset, changed = blend @ matrix, blend @ offset, True
  if hue and rng.random() < 0.5:
    t = np.deg2rad(rng.uniform(-hue, hue))
    rotate = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    turn = _YIQ_TO_RGB @ rotate @ _RGB_TO_YIQ
    matrix, offset, changed = turn @ matrix, turn @ offset, True
  return np.concatenate([matrix, offset[:, None]], axis=1) if changed else None


def photometric(image: np.ndarray, rng: np.random.Generator, *, brightness: float,
                contrast: float, saturation: float, hue: float) -> np.ndarray:
  """Random colour jitter (see `colour_matrix`), applied by PIL in C, clipped to 0..255."""
  affine = colour_matrix(rng, brightness=brightness, contrast=contrast, saturation=saturation,
                         hue=hue)
  if affine is None:
    return image
  return np.asarray(Image.fromarray(image).convert("RGB", tuple(affine.ravel().tolist())))


@dataclasses.dataclass(frozen=True)
class Augment(grain.RandomMapTransform):
  """Random scale + crop (+ pad), horizontal flip and photometric jitter of one example."""

  crop_size: tuple[int, int]
  min_scale: float = 0.5
  max_scale: float = 2.0
  flip: bool = True
  brightness: float = 32.0  # +- on the 0..255 scale
  contrast: float = 0.5  # factor in [1 - c, 1 + c]
  saturation: float = 0.5
  hue: float = 18.0  # +- degrees
  ignore_index: int = 255

  def __post_init__(self):
    if not 0 < self.min_scale <= self.max_scale:
      raise JaxsegError(f"data.scale_range=({self.min_scale}, {self.max_scale}) must satisfy "
                        "0 < min <= max")
    if len(self.crop_size) != 2 or min(self.crop_size) < 1:
      raise JaxsegError(f"data.crop_size={self.crop_size} must be (height, width), both >= 1")

  def random_map(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    # Log-uniform scale: zooming in by 2 and out by 2 equally often.
    scale = float(np.exp(rng.uniform(np.log(self.min_scale), np.log(self.max_scale))))
    image, label = scale_crop(example["image"], example["label"], scale,
                              tuple(self.crop_size), tuple(rng.random(2)), self.ignore_index)
    if self.flip and rng.random() < 0.5:
      image, label = image[:, ::-1], label[:, ::-1]
    if image.dtype == np.uint8 and image.shape[-1] == 3:
      # Colour jitter means something for photographs only: on a grey scan, a 16-bit or
      # multi-band tile there is no hue or saturation, and the 0..255 brightness scale is wrong.
      image = photometric(image, rng, brightness=self.brightness, contrast=self.contrast,
                          saturation=self.saturation, hue=self.hue)
    return {"image": np.ascontiguousarray(image), "label": np.ascontiguousarray(label)}


@dataclasses.dataclass(frozen=True)
class PadTo(grain.MapTransform):
  """Pads (bottom/right) to a fixed size so that images of different sizes batch together;
  padded labels are `ignore_index`, so they count in no metric. Larger images are an error."""

  size: tuple[int, int]
  ignore_index: int = 255

  def map(self, example: dict[str, Any]) -> dict[str, Any]:
    h, w = example["label"].shape
    th, tw = self.size
    if h > th or w > tw:
      raise JaxsegError(f"{example.get('name', 'an example')} is {h}x{w} (HxW), larger than the "
                        f"evaluation canvas {th}x{tw}; raise data.eval_size")
    if (h, w) == (th, tw):
      return example
    image = np.zeros((th, tw, example["image"].shape[-1]), example["image"].dtype)
    label = np.full((th, tw), self.ignore_index, np.uint8)
    image[:h, :w], label[:h, :w] = example["image"], example["label"]
    return {**example, "image": image, "label": label}
