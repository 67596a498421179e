"""Pictures of results: prediction grids with a class legend."""

from __future__ import annotations

import textwrap
from typing import Sequence

import numpy as np


def colorize(labels: np.ndarray, palette: np.ndarray, ignore_index: int = 255,
             ignore_color=(255, 255, 255)) -> np.ndarray:
  """(H, W) class ids -> (H, W, 3) uint8 colours; `ignore_index` pixels in `ignore_color`."""
  palette = np.asarray(palette, np.uint8)
  lut = np.zeros((256, 3), np.uint8)
  lut[:len(palette)] = palette
  lut[ignore_index] = ignore_color
  return lut[np.asarray(labels, np.uint8)]


def as_rgb(images: np.ndarray, bands: Sequence[int] | None = None,
           what: str = "--config.data.display_bands") -> np.ndarray:
  """uint8 RGB (N, H, W, 3) to look at, from images (N, H, W, C) of any channel count and dtype.

  `bands`: the one band shown in grey or the three shown as R, G, B (e.g. (3, 2, 1), a
  satellite tile's false colour); by default RGB as it is and the first band otherwise. 8-bit
  bands are shown as they are; others (16-bit, float) stretched per image and band between
  their 2nd and 98th percentiles, as remote-sensing viewers do, so a 12-bit scan is not black.
  """
  images = np.asarray(images)
  c = images.shape[-1]
  if bands is None or len(bands) == 0:
    bands = (0, 1, 2) if c == 3 else (0,)
  bands = tuple(int(b) for b in bands)
  if len(bands) not in (1, 3) or not all(0 <= b < c for b in bands):
    raise ValueError(f"{what}={bands}: give 1 or 3 band indices in 0..{c - 1}")
  chosen = images[..., list(bands)]
  if chosen.dtype != np.uint8:
    values = chosen.astype(np.float32)
    # nan-aware: a tile's nodata pixels (NaN) neither set the range nor break the picture.
    low = np.nanpercentile(values, 2, axis=(1, 2), keepdims=True)
    high = np.nanpercentile(values, 98, axis=(1, 2), keepdims=True)
    scaled = np.nan_to_num((values - low) / np.where(high > low, high - low, 1.0))
    chosen = np.clip(np.round(scaled * 255), 0, 255).astype(np.uint8)
  return np.repeat(chosen, 3, axis=-1) if len(bands) == 1 else chosen


def prediction_grid(path: str, images: np.ndarray, labels: np.ndarray,
                    predictions: np.ndarray, class_names: Sequence[str], palette: np.ndarray,
                    *, ignore_index: int = 255, title: str | None = None,
                    extra_columns: dict[str, np.ndarray] | None = None,
                    bands: Sequence[int] | None = None) -> str:
  """Writes a PNG with one row per example: image | ground truth | prediction, and a legend.

  `extra_columns` {name: label maps (N, H, W)} are shown between ground truth and prediction.
  Images that are not 8-bit RGB are shown by `as_rgb(images, bands)`.
  """
  images = as_rgb(images, bands)
  return labelled_grid(path, {"image": images, "ground truth": labels, **(extra_columns or {}),
                              "prediction": predictions}, class_names, palette,
                       ignore_index=ignore_index, title=title)


def labelled_grid(path: str, columns: dict[str, np.ndarray], class_names: Sequence[str],
                  palette: np.ndarray, *, ignore_index: int = 255,
                  title: str | None = None) -> str:
  """Writes a PNG with one row per example and a column per entry of `columns`, titled with
  its name: uint8 images (N, H, W, 3) as they are, label maps (N, H, W) in the palette's
  colours, with a legend of the classes the label maps show."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib.patches import Patch  # pylint: disable=g-import-not-at-top

  maps = [np.asarray(c) for c in columns.values() if np.ndim(c) == 3]
  n = len(next(iter(columns.values())))
  # The legend lists the classes in the picture only: COCO's 81 (or 171) would not fit.
  shown = np.unique(np.concatenate([np.unique(m) for m in maps])) if maps else []
  handles = [Patch(facecolor=np.asarray(palette[k]) / 255.0, edgecolor="k", label=class_names[k])
             for k in shown if k < len(class_names)]
  if any((m == ignore_index).any() for m in maps):
    handles.append(Patch(facecolor="white", edgecolor="k", label=f"ignore ({ignore_index})"))
  ncol = min(len(handles), 5) or 1
  legend_height = 0.3 * -(-len(handles) // ncol) + 0.2
  height = 2.5 * n + legend_height + (0.35 if title else 0)
  fig, axes = plt.subplots(n, len(columns), figsize=(2.5 * len(columns), height), squeeze=False)
  for j, (name, column) in enumerate(columns.items()):
    for i in range(n):
      picture = column[i] if np.ndim(column) == 4 else colorize(column[i], palette, ignore_index)
      axes[i, j].imshow(picture, interpolation="nearest")
      axes[i, j].set_xticks([])
      axes[i, j].set_yticks([])
      if i == 0:
        axes[i, j].set_title(name)
  fig.legend(handles=handles, loc="lower center", ncol=ncol, frameon=False)
  if title:
    fig.suptitle(title)
  fig.tight_layout(rect=(0, legend_height / height, 1, 1 - (0.35 / height if title else 0)))
  # Near the images' own resolution (a 2.5-inch column), so thin structures such as superpixel
  # boundaries are not aliased away; 64-pixel images stay at 80 dpi.
  width = np.shape(next(iter(columns.values())))[2]
  fig.savefig(path, dpi=int(np.clip(width / 2.5, 80, 160)))
  plt.close(fig)
  return path


def attention_grid(path: str, images: np.ndarray, maps: dict[str, np.ndarray], *,
                   title: str | None = None) -> str:
  """Writes a PNG with one row per example: the image, then each attention map (0..1) over it."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  n, names = len(images), list(maps)
  fig, axes = plt.subplots(n, 1 + len(names), figsize=(2.5 * (1 + len(names)), 2.5 * n + 0.6),
                           squeeze=False)
  for i in range(n):
    axes[i, 0].imshow(images[i])
    for j, name in enumerate(names, 1):
      h, w = images[i].shape[:2]
      axes[i, j].imshow(images[i], alpha=0.35)
      shown = axes[i, j].imshow(maps[name][i], cmap="magma", vmin=0.0, vmax=1.0, alpha=0.8,
                                extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    for j, name in enumerate(["image"] + names):
      axes[i, j].set_xticks([])
      axes[i, j].set_yticks([])
      if i == 0:
        axes[i, j].set_title(name)
  if names:
    fig.colorbar(shown, ax=axes.ravel().tolist(), shrink=0.6, label="attention")
  if title:
    fig.suptitle(title)
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def tile(path: str, images: np.ndarray, *, columns: int = 8, gap: int = 2) -> str:
  """Writes uint8 images (N, H, W, 3) as one PNG grid, `columns` per row, white gaps."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  n, h, w, _ = images.shape
  columns = min(columns, n)
  rows = -(-n // columns)
  canvas = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap, 3), 255, np.uint8)
  for i, image in enumerate(images):
    y, x = divmod(i, columns)
    canvas[y * (h + gap):y * (h + gap) + h, x * (w + gap):x * (w + gap) + w] = image
  Image.fromarray(canvas).save(path)
  return path


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def confusion_heatmap(path: str, confusion: np.ndarray, class_names: Sequence[str], *,
                      title: str | None = None) -> str:
  """Writes the confusion matrix as a heatmap, each row (true class) normalised to sum to 1 so
  that rare classes read as clearly as common ones; cells show the share in percent."""
  plt = _pyplot()
  confusion = np.asarray(confusion, np.float64)
  rows = confusion.sum(1, keepdims=True)
  share = np.divide(confusion, rows, out=np.zeros_like(confusion), where=rows > 0)
  k = len(class_names)
  size = max(4.0, 0.45 * k + 2.0)
  fig, ax = plt.subplots(figsize=(size + 1.0, size))
  shown = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
  if k <= 30:  # COCO's 81 classes: colours only
    for i in range(k):
      for j in range(k):
        if share[i, j] >= 0.005:
          ax.text(j, i, f"{100 * share[i, j]:.0f}", ha="center", va="center", fontsize=7,
                  color="white" if share[i, j] > 0.5 else "black")
  ax.set_xticks(range(k))
  ax.set_yticks(range(k))
  ax.set_xticklabels(class_names, rotation=60, ha="right", fontsize=8)
  ax.set_yticklabels(class_names, fontsize=8)
  ax.set_xlabel("predicted class")
  ax.set_ylabel("true class")
  fig.colorbar(shown, ax=ax, shrink=0.8, label="share of the true class's pixels")
  return _save(plt, fig, ax, path, title)


def _save(plt, fig, ax, path: str, title: str | None) -> str:
  if title:  # wrapped to the figure's width (about 9 characters an inch at 10 points)
    ax.set_title("\n".join(textwrap.wrap(title, int(fig.get_figwidth() * 9))), fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def overlay(image: np.ndarray, labels: np.ndarray, palette: np.ndarray, *,
            alpha: float = 0.5, ignore_index: int = 255) -> np.ndarray:
  """The image with its label map's colours blended in (`alpha` of the colour); uint8.

  Blended 256 rows at a time: whole, a 6000x6000 photograph's float32 temporaries took 2 GB."""
  image, labels = np.asarray(image), np.asarray(labels)
  out = np.empty(image.shape, np.uint8)
  for top in range(0, image.shape[0], 256):
    rows = slice(top, top + 256)
    pixels = image[rows].astype(np.float32)
    blended = (1 - alpha) * pixels + alpha * colorize(labels[rows], palette,
                                                       ignore_index).astype(np.float32)
    keep = labels[rows] == ignore_index
    blended[keep] = pixels[keep]
    out[rows] = np.clip(np.round(blended), 0, 255)
  return out


def grouped_bars(path: str, groups: Sequence[str], series: dict[str, Sequence[float | None]],
                 *, errors: dict[str, np.ndarray] | None = None, ylabel: str = "",
                 title: str = "", ylim: tuple[float, float] | None = (0.0, 1.0)) -> str:
  """Writes a bar chart: for each group (x tick), one bar per series (legend). None or NaN
  values leave a gap; `errors` {series: (2, groups) below/above} draws error bars."""
  plt = _pyplot()
  k, n = len(groups), len(series)
  fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.1 * k * n + 0.5 * k + 2)), 3.8))
  width = 0.8 / max(n, 1)
  for j, (name, values) in enumerate(series.items()):
    values = np.array([np.nan if v is None else v for v in values], np.float64)
    ax.bar(np.arange(k) + (j - (n - 1) / 2) * width, values, width, label=name,
           yerr=None if errors is None or name not in errors else errors[name], capsize=2)
  ax.set_xticks(np.arange(k))
  tilt = k > 4 or max(len(g) for g in groups) > 8
  ax.set_xticklabels(groups, rotation=30 if tilt else 0, ha="right" if tilt else "center")
  ax.set_ylabel(ylabel)
  if ylim is not None:
    ax.set_ylim(*ylim)
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
  return _save(plt, fig, ax, path, title)
