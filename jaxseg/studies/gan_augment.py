"""GAN augmentation: do a mask-to-image GAN's (image, label map) pairs raise a model's mIoU?

`run(config, workdir)` does four stages, each resumable in `workdir`:

    gan/                    the mask-to-image GAN (jaxseg.train.gan_loop) on the real train split
    generated/              `augment.num_pairs` pairs: label maps cropped from real train maps,
                            a fraction of them perturbed (objects of other maps pasted in at other
                            places, flips), each rendered by the GAN's EMA generator
    real_seedS/             the segmentation model trained on the real data (seed S)
    real+generated_seedS/   the same model, seed and number of steps on real + generated pairs

and writes `summary.json` (val mIoU of both arms per seed, their mean and the paired difference,
with the GAN's FID/KID), `generated_pairs.png` and `per_class_iou.png`.

The label maps come only from the real train split the segmentation model sees
(`data.num_train_examples` of them, if set), so the comparison is fair: the GAN adds no
labels the real arm could not have had, only new images for them and new layouts.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from typing import Any

import jax
import ml_collections
import numpy as np
import scipy.ndimage
import tqdm

from jaxseg import visualize
from jaxseg.data import from_config, generated
from jaxseg.errors import JaxsegError
from jaxseg.train import gan_loop, segmentation
from jaxseg.train.checkpoint import workdir_path

ARMS = ("real", "real+generated")


def gan_config(config) -> ml_collections.ConfigDict:
  """The GAN's config: `config.gan` with the shared `config.data`, without colour jitter
  (the generator would learn jittered colours)."""
  gan = copy.deepcopy(config.gan)
  with gan.unlocked():
    gan.data = copy.deepcopy(config.data)
  gan.data.photometric = False
  gan.data.extra_train_dir = ""  # the GAN learns from real pairs only
  if gan.model.kind != "mask":
    raise JaxsegError(f"--config.gan.model.kind={gan.model.kind!r}: augmentation needs "
                      f"the mask-to-image GAN (kind 'mask'), which draws an image for a label map")
  return gan


def segmentation_config(config, seed: int, extra_train_dir: str = "") -> ml_collections.ConfigDict:
  """One arm's config: `config.segmentation` with the shared data, `seed` and extra pairs."""
  seg = copy.deepcopy(config.segmentation)
  with seg.unlocked():
    seg.data = copy.deepcopy(config.data)
  seg.data.extra_train_dir = extra_train_dir
  seg.train.seed = seed
  return seg


def random_crop(array: np.ndarray, size, rng: np.random.Generator,
                fill: np.ndarray | int = 0) -> np.ndarray:
  """A random `size` window of an (H, W, ...) array; one smaller than `size` is first padded
  at the bottom/right with `fill` (per channel), as the training pipeline pads small images."""
  h, w = array.shape[:2]
  if h < size[0] or w < size[1]:
    padded = np.empty((max(h, size[0]), max(w, size[1]), *array.shape[2:]), array.dtype)
    padded[...] = fill
    padded[:h, :w] = array
    array, h, w = padded, *padded.shape[:2]
  y, x = rng.integers(0, h - size[0] + 1), rng.integers(0, w - size[1] + 1)
  return array[y:y + size[0], x:x + size[1]]


def paste_objects(label: np.ndarray, donor: np.ndarray, rng: np.random.Generator, *,
                  max_objects: int, ignore_index: int = 255, background: int | None = None,
                  min_area: float = 0.005) -> tuple[np.ndarray, int]:
  """Copies up to `max_objects` connected regions of one class of `donor` into `label`, each
  shifted to a random place where it fits whole; returns (new label map, objects pasted).

  Not taken: the `background` class (a pasted blob of it would erase real objects), regions
  that touch the donor's border (they may be cut off there), specks under `min_area` of the
  map (nothing the generator can draw), and regions of half the map or more (a pasted sky is
  a new map, not a new layout).
  """
  out = label.copy()
  h, w = label.shape
  candidates = []
  for k in np.unique(donor):
    if k in (ignore_index, background):
      continue
    components, n = scipy.ndimage.label(donor == k)
    # Components that reach the border: their labels on the outermost rows and columns.
    border = set(np.unique(np.concatenate([components[0], components[-1], components[:, 0],
                                           components[:, -1]])).tolist())
    for i in range(1, n + 1):
      mask = components == i
      if i not in border and min_area * h * w <= mask.sum() < 0.5 * h * w:
        candidates.append((int(k), mask))
  if not candidates:
    return out, 0
  count = int(rng.integers(1, max_objects + 1))
  chosen = rng.choice(len(candidates), size=min(count, len(candidates)), replace=False)
  for i in chosen:
    k, mask = candidates[i]
    # A shift that keeps the whole object inside the map: objects move, they are not cut.
    ys, xs = np.nonzero(mask)
    dy = rng.integers(-ys.min(), h - ys.max())
    dx = rng.integers(-xs.min(), w - xs.max())
    out[ys + dy, xs + dx] = k
  return out, len(chosen)


def background_class(source) -> int | None:
  """The class called "background", if any (as the GAN loop takes it)."""
  return 0 if source.class_names[0] == "background" else None


DONOR_TRIES = 10  # donor crops tried for a perturbed map before it is left as it is


def label_map(source, index: int, size, seed: int, *, perturbed: bool, max_objects: int):
  """(label map, real image of its crop, objects pasted) of pair `index`: a random crop (and
  flip) of a random train map; when `perturbed`, objects of other maps are pasted in (donor
  crops are drawn until one has an object that fits, at most DONOR_TRIES).

  A pure function of (seed, index), so an interrupted generation continues with the same maps.
  """
  rng = np.random.default_rng([seed, index])
  ignore = source.ignore_index
  example = source[int(rng.integers(len(source)))]
  stacked = np.concatenate([example["label"][..., None].astype(np.uint8), example["image"]], -1)
  crop = random_crop(stacked, size, rng, fill=np.array([ignore, 0, 0, 0], np.uint8))
  if rng.random() < 0.5:
    crop = crop[:, ::-1]
  label, image, pasted = crop[..., 0], crop[..., 1:], 0
  for _ in range(DONOR_TRIES if perturbed else 0):
    donor = random_crop(source[int(rng.integers(len(source)))]["label"].astype(np.uint8), size,
                        rng, fill=ignore)
    label, pasted = paste_objects(label, donor, rng, max_objects=max_objects,
                                  ignore_index=ignore, background=background_class(source))
    if pasted:
      break
  return np.ascontiguousarray(label), np.ascontiguousarray(image), pasted


def generate_pairs(config, generator, train_source, directory: str) -> dict[str, Any]:
  """Writes `augment.num_pairs` pairs to `directory` (appending to an interrupted run's);
  returns the directory's generation record. Pairs 0.. use real maps, the last
  `augment.perturbed_fraction` perturbed ones."""
  a = config.augment
  n = a.num_pairs
  n_perturbed = int(round(a.perturbed_fraction * n))
  size = generator.image_size
  batch = generator.batch_size
  # Everything the pairs depend on; the bytes also depend on the compiled program (the draw
  # batch, the backend), so those are recorded too.
  record = {"gan_step": generator.step, "gan_model": config.gan.model.to_dict(),
            "num_pairs": n, "num_perturbed": n_perturbed, "max_objects": a.max_objects,
            "seed": a.seed, "train_data": repr(train_source), "size": list(size),
            "draw_batch": batch, "backend": jax.default_backend()}
  done = 0
  if os.path.exists(os.path.join(directory, "meta.json")):
    existing = generated.GeneratedPairs(directory)
    if existing.info.get("generation") != json.loads(json.dumps(record)):
      raise JaxsegError(
          f"{directory} holds pairs generated with other settings ({existing.info.get('generation')}"
          f"); delete it to generate again with {record}")
    done = len(existing)
  bar = tqdm.tqdm(total=n, initial=done, desc="generating pairs", unit="pair",
                  dynamic_ncols=True, disable=jax.process_index() != 0)
  for start in range(done, n, batch):
    indices = range(start, min(start + batch, n))
    maps = [label_map(train_source, i, size, a.seed, perturbed=i >= n - n_perturbed,
                      max_objects=a.max_objects) for i in indices]
    labels = np.stack([m[0] for m in maps])
    images = generator.draw(labels, [jax.random.fold_in(jax.random.key(a.seed), i)
                                     for i in indices])
    if jax.process_index() == 0:  # every process draws (one SPMD program), one writes
      generated.write_pairs(directory, images, labels, class_names=train_source.class_names,
                            palette=train_source.palette,
                            ignore_index=train_source.ignore_index, start=start,
                            info={"generation": record})
    bar.update(len(indices))
  bar.close()
  return record


def pairs_figure(path: str, config, generator, train_source, directory: str, rows: int = 6):
  """Rows of (label map given to G | the real image of that crop | G's image): half from real
  maps, half from perturbed ones (where the real image shows the map before pasting)."""
  pairs = generated.GeneratedPairs(directory)
  n, n_perturbed = len(pairs), pairs.info["generation"]["num_perturbed"]
  first = list(range(min(rows // 2 if n_perturbed else rows, n - n_perturbed)))
  last = list(range(n - n_perturbed, min(n, n - n_perturbed + rows - len(first))))
  shown = first + last
  images, real, labels = [], [], []
  for i in shown:
    label, image, _ = label_map(train_source, i, generator.image_size, config.augment.seed,
                                perturbed=i >= n - n_perturbed,
                                max_objects=config.augment.max_objects)
    labels.append(label)
    real.append(image)
    images.append(pairs[i]["image"])
  visualize.labelled_grid(
      path, {"label map given": np.stack(labels), "real image of the crop": np.stack(real),
             "generated": np.stack(images)},
      train_source.class_names, train_source.palette, ignore_index=train_source.ignore_index,
      title=f"GAN pairs ({len(first)} from real maps, {len(last)} from perturbed maps)")


def per_class_figure(path: str, arms: dict[str, list[dict]], class_names) -> str:
  """Grouped bars: per-class val IoU of each arm (mean over seeds, range as error bars)."""
  series, errors = {}, {}
  for name, runs in arms.items():
    iou = _iou_array([r["per_class_iou"] for r in runs])
    label = f"{name} (mIoU {np.mean([r['miou'] for r in runs]):.3f})"
    with warnings.catch_warnings():  # a class absent from the val split: no bar, no warning
      warnings.simplefilter("ignore", RuntimeWarning)
      mean = np.nanmean(iou, 0)
      if len(runs) > 1:
        errors[label] = np.stack([mean - np.nanmin(iou, 0), np.nanmax(iou, 0) - mean])
    series[label] = mean.tolist()
  return visualize.grouped_bars(
      path, list(class_names), series, errors=errors, ylabel="val IoU",
      title=f"Per-class val IoU, {len(next(iter(arms.values())))} seed(s) per arm")


def _iou_array(rows) -> np.ndarray:
  """Per-seed per-class IoU lists (None: class absent) -> float64 (seeds, classes), NaN gaps."""
  return np.array([[np.nan if v is None else v for v in row] for row in rows], np.float64)


def _mean_per_class(rows) -> list[float | None]:
  """Per-class mean over seeds; None where a class has no IoU in any seed (JSON has no NaN)."""
  iou = _iou_array(rows)
  present = ~np.isnan(iou).all(0)
  means = np.nanmean(np.where(present, iou, 0.0), 0)
  return [round(float(m), 4) if p else None for m, p in zip(means, present)]


def _stats(values):
  values = np.asarray(values, np.float64)
  return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1
          else None, "per_seed": values.tolist()}


def run(config, workdir: str) -> dict[str, Any]:
  """The whole experiment (resuming each stage); returns and writes summary.json."""
  workdir = workdir_path(workdir)
  a = config.augment
  if a.num_pairs < 1:
    raise JaxsegError(f"--config.augment.num_pairs={a.num_pairs} must be at least 1")
  if not 0.0 <= a.perturbed_fraction <= 1.0:
    raise JaxsegError(f"--config.augment.perturbed_fraction={a.perturbed_fraction} must be in "
                      "[0, 1]")
  if a.max_objects < 1:
    raise JaxsegError(f"--config.augment.max_objects={a.max_objects} must be at least 1")
  if not a.seeds:
    raise JaxsegError("--config.augment.seeds is empty; give at least one seed, e.g. (0,)")
  os.makedirs(workdir, exist_ok=True)
  gan_dir, pairs_dir = os.path.join(workdir, "gan"), os.path.join(workdir, "generated")

  gan_cfg = gan_config(config)
  gan_summary = gan_loop.train_and_evaluate(gan_cfg, gan_dir)
  generator = gan_loop.restore_generator(gan_cfg, gan_dir)
  train_source, _ = from_config.make_sources(segmentation_config(config, a.seeds[0]))
  generate_pairs(config, generator, train_source, pairs_dir)
  pairs_figure(os.path.join(workdir, "generated_pairs.png"), config, generator, train_source,
               pairs_dir)

  runs = {arm: [] for arm in ARMS}
  for seed in a.seeds:
    for arm, extra in zip(ARMS, ("", pairs_dir)):
      runs[arm].append(segmentation.train_and_evaluate(
          segmentation_config(config, seed, extra), os.path.join(workdir, f"{arm}_seed{seed}")))
  class_names = runs["real"][0]["class_names"]
  per_class_figure(os.path.join(workdir, "per_class_iou.png"), runs, class_names)

  keys = ("miou", "pixel_accuracy", "mean_dice")
  arms = {arm: {**{k: _stats([r[k] for r in rs]) for k in keys},
                "per_class_iou": _mean_per_class([r["per_class_iou"] for r in rs]),
                "steps": rs[0]["steps"], "train_seconds": sum(r["train_seconds"] for r in rs)}
          for arm, rs in runs.items()}
  difference = [g["miou"] - r["miou"] for r, g in zip(runs["real"], runs["real+generated"])]
  result = {
      "dataset": config.data.name, "seeds": list(a.seeds), "class_names": class_names,
      "real_train_examples": len(train_source),
      "generated_pairs": a.num_pairs,
      "generated_from_perturbed_maps": int(round(a.perturbed_fraction * a.num_pairs)),
      # The share of the real+generated arm's examples that are generated (data.
      # extra_train_fraction; 0 means each pair as often as each real image).
      "extra_train_fraction": config.data.extra_train_fraction,
      "segmentation_model": config.segmentation.model.name,
      "arms": arms,
      "miou_difference": _stats(difference),  # real+generated minus real, paired by seed
      "gan": {k: gan_summary[k] for k in ("fid", "kid", "kid_std", "fid_features", "steps",
                                          "train_seconds", "image_size")},
  }
  if jax.process_index() == 0:
    tmp = os.path.join(workdir, "summary.json.tmp")
    with open(tmp, "w") as f:
      json.dump(result, f, indent=2)
    os.replace(tmp, os.path.join(workdir, "summary.json"))
  return result
