"""Images of any size on a few fixed-shape programs: size buckets for a folder of many sizes,
and bands of sliding windows for an image too large to hold the scores of.

`experiments.predict` uses both (jaxseg.predict): each compiled program is jitted per input
shape, so a folder of 1000 sizes would otherwise compile 1000 of them.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from scipy import special

from jaxseg import inference
from jaxseg.train import sharding


def bucket_size(n: int) -> int:
  """`n` rounded up to a multiple of 32, or of 1/8 of the power of two below it when that is
  larger (600 -> 640, 1000 -> 1024, 6000 -> 6144): 33 sizes from 256 to 4096 pixels, each at
  most 1/8 more than the sizes it holds (below 256, multiples of 32, which every network here
  divides)."""
  step = max(32, (1 << (n.bit_length() - 1)) // 8)
  return -(-n // step) * step


def tiled_labels(members: Sequence, weights: Sequence[float], image: np.ndarray,
                 window: Sequence[int], batch_size: int = 8, mesh=None) -> np.ndarray:
  """uint8 (H, W) labels of one large image by sliding `window`: the windows, logit averages
  and weighted mean of the members' probabilities of `probabilities(image[None],
  window=window)`, but only a band of window rows is ever held. Memory grows with the
  window's height times the image's width, not with the image: a 6000x6000 photograph's
  19-class probabilities alone are 2.7 GB.

  Windows go `batch_size` at a time (one compiled shape: the last batch is filled up), sharded
  over `mesh`'s devices."""
  mesh = mesh or sharding.make_mesh()
  h, w = image.shape[:2]
  wh, ww = min(window[0], h), min(window[1], w)
  ys, xs = inference.window_starts(h, wh), inference.window_starts(w, ww)
  row_count, col_count = np.zeros(h, np.float32), np.zeros(w, np.float32)
  for y in ys:
    row_count[y:y + wh] += 1
  for x in xs:
    col_count[x:x + ww] += 1
  devices = mesh.devices.size
  # A band's windows in equal batches of at most `batch_size` (a multiple of the device
  # count): 18 windows go 6, 6, 6, not 8, 8 and 2 filled up to 8.
  per_batch = -(-len(xs) // -(-len(xs) // batch_size))
  rows = -(-per_batch // devices) * devices
  k = members[0].num_classes
  labels = np.empty((h, w), np.uint8)
  top, sums = 0, [np.zeros((0, w, k), np.float32) for _ in members]  # rows [top, top + len)
  for i, y in enumerate(ys):
    grow = y + wh - top - len(sums[0])
    if grow > 0:
      sums = [np.concatenate([s, np.zeros((grow, w, k), np.float32)]) for s in sums]
    for start in range(0, len(xs), per_batch):
      chunk = xs[start:start + per_batch]
      crops = np.zeros((rows, wh, ww, image.shape[-1]), image.dtype)
      for j, x in enumerate(chunk):
        crops[j] = image[y:y + wh, x:x + ww]
      crops = jax.device_put(crops, sharding.batch_sharding(mesh))
      for member, total in zip(members, sums):
        logits = np.asarray(member.logits(crops))
        for j, x in enumerate(chunk):  # in the order inference.sliding_logits adds them
          total[y - top:y - top + wh, x:x + ww] += logits[j]
    final = ys[i + 1] if i + 1 < len(ys) else h  # no later window reaches these rows
    if final > top:
      count = row_count[top:final, None, None] * col_count[None, :, None]
      mixed = 0.0
      for weight, total in zip(weights, sums):
        mixed = mixed + weight * special.softmax(total[:final - top] / count, axis=-1)
      labels[top:final] = np.argmax(mixed, -1)
      sums = [total[final - top:] for total in sums]
      top = final
  return labels
