"""SyntheticShapes: the embedded default dataset, drawn on the fly from a seed.

Each example is a background (a smooth random colour field with blobs and sensor noise) with
1..max_objects filled shapes (disk, rectangle, triangle, cross) at random positions, scales and
colours, later ones occluding earlier ones, and a label map giving every pixel the class of the
shape on top. Nothing is downloaded, so tests, smoke runs and first training runs work anywhere.

Why shape decides the class: object colours come from one distribution for every class and
backgrounds come in every colour, so a model cannot score by colour; it has to use the outline,
i.e. spatial context, which is what a segmentation network must learn. Objects keep a minimum
colour distance from their surroundings so the task stays learnable. The "hard" preset adds
rotation, stripes and shading on objects and backgrounds, and smaller objects.

Each example is a pure function of (seed, split, index): its generator is
``np.random.default_rng([seed, split_id, index])``, so workers, restarts and any read order see
the same bytes, and the splits are disjoint streams.
"""
import operator

import numpy as np
from PIL import Image, ImageDraw

from jaxseg.errors import JaxsegError

# split name -> (id mixed into the seed, default length). Train is effectively unbounded.
_SPLITS = {"train": (0, 100_000), "val": (1, 64), "test": (2, 64)}

# Outlines centred on the origin with roughly equal area (~0.75 at size 1), so that no class
# dominates the pixel counts; per-object aspect, scale and rotation are applied later.
_ANGLES = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
_DISK = 0.5 * np.stack([np.cos(_ANGLES), np.sin(_ANGLES)], axis=-1)  # diameter 1
_SQUARE = 0.95 * np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
_TRI_ANGLES = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
_TRIANGLE = 1.3 * np.stack([np.cos(_TRI_ANGLES), np.sin(_TRI_ANGLES)], axis=-1) / np.sqrt(3)

# RGB distance between an object's colour and its surroundings' mean; closer colours make
# objects vanish into the texture, which teaches nothing.
_MIN_CONTRAST = 90.0

# Difficulty presets. "default" is tuned so that DeepLabV3+ ResNet-101 trained from scratch for
# ~6 minutes on a 2-core CPU gets past 0.5 val mIoU: upright shapes (rotation +-0 degrees), flat
# colours over a smooth random colour field with noise. Each ingredient of "hard" (rotated
# shapes, striped backgrounds and objects, shaded objects, smaller objects) costs mIoU at a fixed
# budget, as measured in benchmarks/RESULTS.md; "hard" is for longer runs on accelerators.
#   size: outline scale as a fraction of the shorter side; rotation: +- degrees; gradient: max
#   per-channel swing of an object's shading; *_stripes: chance of stripes; objects: max count.
PRESETS = {
    "default": dict(size=(0.25, 0.5), rotation=0.0, gradient=0.0, object_stripes=0.0,
                    background_stripes=0.0, objects=3),
    "hard": dict(size=(0.14, 0.45), rotation=180.0, gradient=60.0, object_stripes=0.25,
                 background_stripes=0.5, objects=4),
}


def _cross(half_width: float) -> np.ndarray:
  """Plus sign 1.15 across from tip to tip with arms of the given half width."""
  h, e = half_width, 0.575
  return np.array([[-h, -e], [h, -e], [h, -h], [e, -h], [e, h], [h, h],
                   [h, e], [-h, e], [-h, h], [-e, h], [-e, -h], [-h, -h]])


def _outline(rng: np.random.Generator, cls: int) -> np.ndarray:
  """Outline of class `cls` at size 1 with a mild random aspect ratio, (N, 2)."""
  if cls == 1:
    base, aspect = _DISK, rng.uniform(0.75, 1.0)
  elif cls == 2:
    base, aspect = _SQUARE, rng.uniform(0.55, 1.0)
  elif cls == 3:
    base, aspect = _TRIANGLE, rng.uniform(0.8, 1.15)
  else:
    base, aspect = _cross(rng.uniform(0.17, 0.23)), rng.uniform(0.85, 1.0)
  return base * np.array([1.0, aspect])


def _stripes(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, period: float) -> np.ndarray:
  """Sine or square-wave stripes at a random angle and phase, values in [-1, 1]."""
  angle, phase = rng.uniform(0.0, 2.0 * np.pi, 2).astype(np.float32)
  k = np.float32(2.0 * np.pi / period)
  s = np.sin(xs * (k * np.cos(angle)) + ys * (k * np.sin(angle)) + phase)
  return np.sign(s) if rng.random() < 0.5 else s


def _background(rng: np.random.Generator, h: int, w: int, ys, xs,
                stripes: float) -> np.ndarray:
  """Gradient mixed with soft colour blobs, sometimes striped; float32 (3, h, w).

  The smooth part lives on a coarse grid upsampled by PIL, which costs one C call, where a
  separable matmul would start BLAS threads that fight the input pipeline's worker processes.
  """
  g = int(rng.integers(2, 6))  # grid nodes per side: 2 = gentle gradients, 5 = a few blobs
  nodes = np.linspace(-0.5, 0.5, g)
  angle = rng.uniform(0.0, 2.0 * np.pi)
  ramp = np.cos(angle) * nodes[None, :] + np.sin(angle) * nodes[:, None]  # (g, g) in [-0.71, 0.71]
  gradient = rng.uniform(40, 215, 3) + ramp[..., None] * rng.uniform(-150, 150, 3)
  mix = rng.uniform(0.2, 0.7)
  grid = (1.0 - mix) * gradient + mix * rng.uniform(0, 255, (g, g, 3))
  smooth = Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
  bg = np.stack([np.asarray(c) for c in smooth.split()]).astype(np.float32)
  if rng.random() < stripes:
    period = rng.uniform(0.04, 0.2) * min(h, w)
    bg += _stripes(rng, ys, xs, period)[None] * rng.uniform(-50, 50, (3, 1, 1)).astype(np.float32)
  return bg


def _pick_colour(rng: np.random.Generator, local_mean: np.ndarray) -> np.ndarray:
  """Uniform random RGB, rejecting colours too close to the surroundings (class-independent)."""
  candidates = rng.uniform(0, 255, (8, 3))
  dist = np.linalg.norm(candidates - local_mean, axis=-1)
  ok = np.flatnonzero(dist >= _MIN_CONTRAST)
  return candidates[ok[0] if ok.size else np.argmax(dist)].astype(np.float32)


class SyntheticShapes:
  """Procedural shapes-on-texture segmentation; a grain RandomAccessDataSource.

  `image_size` is an int or (height, width). Examples are dicts with "image" uint8 (H, W, 3)
  and "label" uint8 (H, W) holding class ids in [0, num_classes).
  """

  class_names = ("background", "disk", "rectangle", "triangle", "cross")
  num_classes = len(class_names)
  # Black background and four distinct saturated hues, readable against black.
  palette = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 225, 25]],
                     np.uint8)
  ignore_index = 255

  def __init__(self, split: str = "train", *, image_size: int | tuple[int, int] = 128,
               num_examples: int | None = None, seed: int = 0, max_objects: int | None = None,
               preset: str = "default"):
    if preset not in PRESETS:
      raise JaxsegError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    self.preset = preset
    self._p = PRESETS[preset]
    max_objects = self._p["objects"] if max_objects is None else max_objects
    if split not in _SPLITS:
      raise JaxsegError(f"unknown split {split!r}; valid splits: {', '.join(_SPLITS)}")
    if isinstance(image_size, int):
      image_size = (image_size, image_size)
    self.image_size = tuple(int(s) for s in image_size)
    if len(self.image_size) != 2 or min(self.image_size) < 8:
      raise JaxsegError(f"image_size must be an int or (height, width), each >= 8; got {image_size}")
    if not 1 <= max_objects <= 254:  # instance ids 1..max_objects live in a uint8 map
      raise JaxsegError(f"max_objects must be in [1, 254]; got {max_objects}")
    self.split = split
    self._split_id, default_len = _SPLITS[split]
    self.num_examples = default_len if num_examples is None else int(num_examples)
    self.seed = int(seed)
    self.max_objects = int(max_objects)

  def __len__(self) -> int:
    return self.num_examples

  def __repr__(self) -> str:
    # Grain compares this string when restoring a checkpoint, so it holds constructor args only.
    return (f"SyntheticShapes(split={self.split!r}, image_size={self.image_size}, "
            f"num_examples={self.num_examples}, seed={self.seed}, max_objects={self.max_objects}, "
            f"preset={self.preset!r})")

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    image, label, _ = self._render(index)
    return {"image": image, "label": label}

  def _render(self, index) -> tuple[np.ndarray, np.ndarray, list[tuple[int, np.ndarray]]]:
    """Image, label and the drawn objects as (class, polygon (N, 2) in x, y) in drawing order."""
    index = operator.index(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {self!r}")
    rng = np.random.default_rng([self.seed, self._split_id, index])
    h, w = self.image_size
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]

    # Geometry first: one instance-id map drawn in order, so later objects overwrite (occlude)
    # earlier ones; label and image are both read from it and so align pixel for pixel.
    n = int(rng.integers(1, self.max_objects + 1))
    classes = rng.integers(1, self.num_classes, n)
    inst_img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(inst_img)
    objects = []
    for i, cls in enumerate(classes, start=1):
      size = rng.uniform(*self._p["size"]) * min(h, w)
      angle = np.deg2rad(rng.uniform(-self._p["rotation"], self._p["rotation"]))
      centre = rng.uniform(0.1, 0.9, 2) * (w, h)
      rot = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
      poly = _outline(rng, int(cls)) * size @ rot + centre
      draw.polygon(poly.ravel().tolist(), fill=i)  # PIL polygons are never antialiased
      objects.append((int(cls), poly))
    inst = np.asarray(inst_img)
    lut = np.zeros(256, np.uint8)
    lut[1:n + 1] = classes
    label = lut[inst]

    # The canvas is channel-first float32: numpy broadcasts (3, 1, 1) against (3, h, w) many
    # times faster than (3,) against (h, w, 3), and this loop is the input pipeline's hot path.
    canvas = _background(rng, h, w, ys, xs, self._p["background_stripes"])
    for i, (_, poly) in enumerate(objects, start=1):
      # Work inside the bounding box only: cheap for small objects at large image sizes.
      x0, y0 = np.maximum(np.floor(poly.min(0)).astype(int) - 1, 0)
      x1, y1 = np.minimum(np.ceil(poly.max(0)).astype(int) + 2, (w, h))
      region = canvas[:, y0:y1, x0:x1]
      colour = _pick_colour(rng, region.mean((1, 2)))
      # Texture (gradient, sometimes stripes) so that flat fill cannot separate objects from
      # the background; the gradient is centred on the box and spans at most +-42 per channel,
      # so the object's mean keeps its contrast margin and the outline stays visible.
      extent = np.float32(max(x1 - x0, y1 - y0, 1))
      g_angle = rng.uniform(0.0, 2.0 * np.pi)
      g = ((xs[:, x0:x1] - (x0 + x1) / 2) * np.float32(np.cos(g_angle) / extent)
           + (ys[y0:y1] - (y0 + y1) / 2) * np.float32(np.sin(g_angle) / extent))  # in [-0.71, 0.71]
      delta = rng.uniform(-self._p["gradient"], self._p["gradient"], (3, 1, 1)).astype(np.float32)
      fill = colour[:, None, None] + g[None] * delta
      if rng.random() < self._p["object_stripes"]:
        period = rng.uniform(0.15, 0.35) * extent
        amp = rng.uniform(-30, 30, (3, 1, 1)).astype(np.float32)
        fill += _stripes(rng, ys[y0:y1], xs[:, x0:x1], period)[None] * amp
      np.copyto(region, fill, where=(inst[y0:y1, x0:x1] == i)[None])

    # Sensor-like noise on the image only (one luminance channel: a third of the cost).
    sigma = np.float32(rng.uniform(0.0, 14.0))
    canvas += (rng.random((h, w), dtype=np.float32) - np.float32(0.5)) * sigma
    channels = np.clip(canvas, 0, 255, out=canvas).astype(np.uint8)
    image = np.empty((h, w, 3), np.uint8)
    for c in range(3):  # three strided copies: ~5x cheaper than np.moveaxis(...).copy() here
      image[..., c] = channels[c]
    return image, label, objects
