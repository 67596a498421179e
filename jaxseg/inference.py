"""Inference beyond one forward pass: sliding windows and test-time augmentation (pure JAX).

Both follow mmsegmentation's test modes. 'slide' inference averages the logits of overlapping
windows; test-time augmentation runs the model on rescaled (and mirrored) copies of the input,
brings each view's scores back to the input's size and orientation, and averages the class
probabilities of the views. Everything here traces under `jax.jit`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.errors import JaxsegError
from jaxseg.layers import resize_bilinear

# mmsegmentation's multi-scale test ratios (its Cityscapes/ADE20K `img_ratios`).
MULTI_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


@dataclasses.dataclass(frozen=True)
class TTA:
  """Test-time augmentation: the views are every scale, each also mirrored when `flip`."""
  scales: tuple[float, ...] = (1.0,)
  flip: bool = False

  def __post_init__(self):
    scales = tuple(float(s) for s in self.scales)
    if not scales or min(scales) <= 0:
      raise JaxsegError(f"test-time augmentation scales {self.scales} must be positive numbers")
    object.__setattr__(self, "scales", scales)

  @property
  def num_views(self) -> int:
    return len(self.scales) * (2 if self.flip else 1)

  def describe(self) -> str:
    if self.num_views == 1 and self.scales == (1.0,):
      return "none"
    return f"scales {', '.join(f'{s:g}' for s in self.scales)}" + (" + flip" if self.flip else "")


NO_TTA = TTA()
DEFAULT_TTA = TTA(MULTI_SCALES, flip=True)


def window_starts(size: int, window: int, overlap: float = 1 / 3) -> list[int]:
  """Start offsets of windows covering [0, size) with about `overlap` overlap; the last window
  ends at the edge (mmsegmentation's 'slide' inference)."""
  if window >= size:
    return [0]
  stride = max(1, int(window * (1 - overlap)))
  starts = list(range(0, size - window, stride))
  return starts + [size - window]


def sliding_logits(apply: Callable, images, window: tuple[int, int], num_classes: int):
  """Average of the float32 logits of overlapping `window` crops; every pixel is covered.

  The windows run one after another in a `fori_loop` that adds each window's logits into the
  full-size sum: one traced copy of the model (compile time does not grow with the window
  count) and one window's activations and logits live at a time.
  """
  b, h, w, c = images.shape
  wh, ww = min(window[0], h), min(window[1], w)
  boxes = [(y, x) for y in window_starts(h, wh) for x in window_starts(w, ww)]
  starts = jnp.asarray(boxes, jnp.int32)
  count = np.zeros((h, w), np.float32)
  for y, x in boxes:
    count[y:y + wh, x:x + ww] += 1

  def add_window(i, total):
    y, x = starts[i, 0], starts[i, 1]
    crop = jax.lax.dynamic_slice(images, (0, y, x, 0), (b, wh, ww, c))
    logits = apply(crop).astype(jnp.float32)
    here = jax.lax.dynamic_slice(total, (0, y, x, 0), (b, wh, ww, num_classes))
    return jax.lax.dynamic_update_slice(total, here + logits, (0, y, x, 0))

  total = jax.lax.fori_loop(0, len(boxes), add_window,
                            jnp.zeros((b, h, w, num_classes), jnp.float32))
  return total / count[None, :, :, None]


def scaled_size(size: Sequence[int], scale: float) -> tuple[int, int]:
  """(h, w) times `scale`, rounded, at least one pixel."""
  return tuple(max(1, int(round(s * scale))) for s in size)


def tta_scores(view_fn: Callable, images, tta: TTA = NO_TTA, *, logits: bool = True,
               stack_flips: bool = True):
  """Mean class probabilities over the views of `tta`: float32 (B, H, W, K).

  `view_fn(images (b, h', w', C)) -> scores (b, h'', w'', K)`, logits when `logits` (each
  view's logits are resized to (H, W) and then soft-maxed, as mmsegmentation does) or
  probabilities otherwise. A view's mirrored copy runs in the same call as the view itself
  (batch 2b): one traced model per scale; with `stack_flips` False, in a call of its own (an
  ONNX converter cannot slice a symbolic batch in two).
  """
  b, h, w = images.shape[:3]

  def score(view):
    scores = resize_bilinear(view_fn(view).astype(jnp.float32), (h, w))
    return jax.nn.softmax(scores, axis=-1) if logits else scores

  total = 0.0
  for scale in tta.scales:
    x = images if scale == 1 else resize_bilinear(images.astype(jnp.float32),
                                                  scaled_size((h, w), scale))
    if not tta.flip:
      total = total + score(x)
    elif stack_flips:
      both = score(jnp.concatenate([x, x[:, :, ::-1]], axis=0))
      total = total + both[:b] + both[b:, :, ::-1]
    else:
      total = total + score(x) + score(x[:, :, ::-1])[:, :, ::-1]
  return total / tta.num_views


def zero_beyond(images, sizes):
  """`images` (B, H, W, C) with every pixel outside each image's own (h, w) = `sizes[b]` set to
  zero: a batch of several sizes padded at the bottom and right."""
  h, w = images.shape[1:3]
  rows = jnp.arange(h)[None, :, None] < sizes[:, 0, None, None]
  cols = jnp.arange(w)[None, None, :] < sizes[:, 1, None, None]
  return jnp.where((rows & cols)[..., None], images, jnp.zeros((), images.dtype))


def predict(apply: Callable, images, num_classes: int, *, tta: TTA = NO_TTA,
            window: tuple[int, int] | None = None):
  """Class probabilities float32 (B, H, W, K) of model `apply(x) -> logits` on preprocessed
  `images`: each view whole, or by sliding `window` where the view is larger than it."""

  def view(x):
    if window is not None and (x.shape[1] > window[0] or x.shape[2] > window[1]):
      return sliding_logits(apply, x, window, num_classes)
    return apply(x)

  return tta_scores(view, images, tta)
