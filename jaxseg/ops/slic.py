"""SLIC superpixels in JAX: jittable, batched, static shapes (Achanta et al., 2012).

The gSLIC formulation (Ren & Reid, 2011): centres start on a regular `grid` of cells, and each
pixel compares itself only with the centres of the 3x3 cells around its own, so one iteration
is 9 distances per pixel and one segment_sum, with no data-dependent shapes. Distances are
scikit-image's: Lab colour plus (compactness / S) x the spatial distance, S the grid step.

Connectivity is then enforced in two fixed-point loops: connected components of every
cluster by min-label propagation, and pixels outside their cluster's largest component take
the label of a settled neighbour until none is left, which keeps every segment connected.
Segment ids are centre indices in [0, grid_h * grid_w): static for the graph builder; some
may be empty.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# sRGB (D65) -> XYZ, and the D65 white point.
_RGB_TO_XYZ = np.array([[0.412453, 0.357580, 0.180423],
                        [0.212671, 0.715160, 0.072169],
                        [0.019334, 0.119193, 0.950227]], np.float32)
_WHITE = np.array([0.95047, 1.0, 1.08883], np.float32)


def rgb_to_lab(rgb):
  """uint8 or [0, 1] float RGB (..., 3) -> CIE Lab (L in 0..100), as skimage.color.rgb2lab."""
  integer = jnp.issubdtype(rgb.dtype, jnp.integer)
  rgb = rgb.astype(jnp.float32) / 255.0 if integer else rgb.astype(jnp.float32)
  linear = jnp.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
  xyz = linear @ _RGB_TO_XYZ.T / _WHITE
  f = jnp.where(xyz > 0.008856, jnp.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
  return jnp.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]),
                    200.0 * (f[..., 1] - f[..., 2])], axis=-1)


def grid_for(height: int, width: int, n_segments: int) -> tuple[int, int]:
  """A grid of about `n_segments` near-square cells."""
  step = np.sqrt(height * width / n_segments)
  return max(1, int(round(height / step))), max(1, int(round(width / step)))


def _blur(lab, sigma: float):
  """Separable Gaussian blur of (B, H, W, 3), edges replicated."""
  radius = int(np.ceil(3 * sigma))
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  taps = jnp.asarray(taps / taps.sum(), jnp.float32)
  for axis in (1, 2):
    pad = [(0, 0)] * 4
    pad[axis] = (radius, radius)
    padded = jnp.pad(lab, pad, mode="edge")
    size = lab.shape[axis]
    lab = sum(taps[k] * jax.lax.slice_in_dim(padded, k, k + size, axis=axis)
              for k in range(2 * radius + 1))
  return lab


def _assign(features, centres, cell, grid, weight):
  """Index (into centres) of the nearest of the 3x3 neighbouring cells' centres per pixel."""
  gh, gw = grid
  best_d, best = None, None
  for dy in (-1, 0, 1):
    for dx in (-1, 0, 1):
      cy = jnp.clip(cell[..., 0] + dy, 0, gh - 1)
      cx = jnp.clip(cell[..., 1] + dx, 0, gw - 1)
      index = cy * gw + cx  # (H, W)
      c = jnp.take(centres, index, axis=0)  # (H, W, 5)
      diff = features - c
      d = jnp.sum(diff[..., :3] ** 2, -1) + weight * jnp.sum(diff[..., 3:] ** 2, -1)
      if best is None:
        best_d, best = d, index
      else:
        closer = d < best_d
        best_d, best = jnp.where(closer, d, best_d), jnp.where(closer, index, best)
  return best


def _neighbours(x, fill):
  """The 4 neighbours of every pixel of (H, W), `fill` outside."""
  up = jnp.pad(x[1:], ((0, 1), (0, 0)), constant_values=fill)
  down = jnp.pad(x[:-1], ((1, 0), (0, 0)), constant_values=fill)
  left = jnp.pad(x[:, 1:], ((0, 0), (0, 1)), constant_values=fill)
  right = jnp.pad(x[:, :-1], ((0, 0), (1, 0)), constant_values=fill)
  return up, down, left, right


def _components(labels):
  """Connected-component ids (the smallest pixel index of each 4-connected same-label
  region) by min propagation to a fixed point."""
  h, w = labels.shape
  big = h * w
  start = jnp.arange(big, dtype=jnp.int32).reshape(h, w)

  def step(state):
    comp, _ = state
    new = comp
    for nc, nl in zip(_neighbours(comp, big), _neighbours(labels, -1)):
      new = jnp.minimum(new, jnp.where(nl == labels, nc, big))
    return new, jnp.any(new != comp)

  comp, _ = jax.lax.while_loop(lambda s: s[1], step, (start, jnp.array(True)))
  return comp


def _enforce_connectivity(labels, num_labels: int):
  """Each label keeps its largest component; other pixels join a settled neighbour."""
  h, w = labels.shape
  comp = _components(labels).ravel()
  size = jnp.zeros(h * w, jnp.int32).at[comp].add(1)
  # The largest component of each label (ties: the smaller component id).
  key = size[comp] * (h * w) + (h * w - 1 - comp)
  best = jnp.zeros(num_labels, key.dtype).at[labels.ravel()].max(key)
  settled = (key == best[labels.ravel()]).reshape(h, w)

  def step(state):
    labels, settled = state
    new_labels, new_settled = labels, settled
    for nl, ns in zip(_neighbours(labels, 0), _neighbours(settled, False)):
      take = ~new_settled & ns
      new_labels = jnp.where(take, nl, new_labels)
      new_settled = new_settled | take
    return new_labels, new_settled

  labels, _ = jax.lax.while_loop(lambda s: ~jnp.all(s[1]), step, (labels, settled))
  return labels


def slic(images, grid: tuple[int, int], *, compactness: float = 10.0, iterations: int = 10,
         sigma: float = 1.0, enforce_connectivity: bool = True):
  """int32 (B, H, W) segment ids in [0, grid[0] * grid[1]) of uint8 RGB images (B, H, W, 3).

  `grid` fixes the number of centres (and so every shape); `grid_for(h, w, n)` picks one for
  about n superpixels. Jit it with `grid`, `iterations` and the flags static.
  """
  b, h, w, _ = images.shape
  gh, gw = grid
  lab = rgb_to_lab(images)
  if sigma > 0:
    lab = _blur(lab, sigma)
  step_y, step_x = h / gh, w / gw
  ys = jnp.arange(h, dtype=jnp.float32)[:, None]
  xs = jnp.arange(w, dtype=jnp.float32)[None, :]
  position = jnp.stack(jnp.broadcast_arrays(ys, xs), -1)  # (H, W, 2)
  cell = jnp.stack(jnp.broadcast_arrays(jnp.minimum((ys / step_y).astype(jnp.int32), gh - 1),
                                        jnp.minimum((xs / step_x).astype(jnp.int32), gw - 1)),
                   -1)  # (H, W, 2): the grid cell each pixel starts in
  weight = (compactness / np.sqrt(step_y * step_x)) ** 2
  cy = (jnp.arange(gh, dtype=jnp.float32) + 0.5) * step_y
  cx = (jnp.arange(gw, dtype=jnp.float32) + 0.5) * step_x
  centre_pos = jnp.stack(jnp.meshgrid(cy, cx, indexing="ij"), -1).reshape(-1, 2)
  k = gh * gw

  def one(lab_img):
    features = jnp.concatenate([lab_img, position], -1)  # (H, W, 5)
    iy = jnp.clip(centre_pos[:, 0].astype(jnp.int32), 0, h - 1)
    ix = jnp.clip(centre_pos[:, 1].astype(jnp.int32), 0, w - 1)
    centres = jnp.concatenate([lab_img[iy, ix], centre_pos], -1)  # (K, 5)

    def iterate(_, centres):
      labels = _assign(features, centres, cell, grid, weight).ravel()
      total = jax.ops.segment_sum(features.reshape(-1, 5), labels, k)
      count = jax.ops.segment_sum(jnp.ones_like(labels, jnp.float32), labels, k)
      return jnp.where(count[:, None] > 0, total / jnp.maximum(count, 1)[:, None], centres)

    centres = jax.lax.fori_loop(0, iterations, iterate, centres)
    labels = _assign(features, centres, cell, grid, weight)
    if enforce_connectivity:
      labels = _enforce_connectivity(labels, k)
    return labels.astype(jnp.int32)

  return jax.vmap(one)(lab)
