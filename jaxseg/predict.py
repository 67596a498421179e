"""Predicting image files with a trained run or an ensemble (`python -m experiments.predict`):
NAME_labels.png, NAME_mask.png and NAME_overlay.png per image, beside it or under --out_dir.

Output names are unique, a file predict did not write is never overwritten without
--overwrite, a manifest in each output folder makes a rerun skip what is up to date, a bad
image is named while the rest are done, and images far larger than the training crops go by
sliding window (docs/evaluation.md).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging
from PIL import Image

from jaxseg import runs, tiling, visualize
from jaxseg.data import from_config
from jaxseg.data.files import BadExample, probe_array, read_array, read_image
from jaxseg.errors import JaxsegError, first_line
from jaxseg.evaluate import Ensemble
from jaxseg.inference import NO_TTA, TTA
from jaxseg.train import sharding
from jaxseg.train.workdir import check_not_locked, ensure_writable


# Predicting image files: NAME_labels.png, NAME_mask.png and NAME_overlay.png per image.

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy")
OUTPUT_KINDS = ("labels", "mask", "overlay")
# In every output folder: the files predict wrote there, so that a rerun may replace or skip
# them while a file of the user's of the same name is never replaced without --overwrite.
PREDICT_MANIFEST = ".jaxseg_predict.json"
# Seconds between rewrites of the manifests while predicting: a rewrite after every image
# would write O(n^2) bytes over n images. A kill loses at most this much of the record, and
# the images it loses are predicted again (they are listed as predict's), never refused.
_MANIFEST_EVERY_S = 5.0


@dataclasses.dataclass
class Predictions:
  """What `export_predictions` did. Iterating it gives `written` (what it used to return)."""
  images: list[str]  # every image asked for, each once
  written: list[str] = dataclasses.field(default_factory=list)  # files written, all on disk
  skipped: list[str] = dataclasses.field(default_factory=list)  # outputs already up to date
  failed: list[str] = dataclasses.field(default_factory=list)  # one line each, naming the image

  def __iter__(self):
    return iter(self.written)

  def __len__(self):
    return len(self.written)

  def summary(self) -> str:
    done = len(self.images) - len(self.skipped) - len(self.failed)
    line = f"wrote {len(self.written)} files for {done} of {len(self.images)} image(s)"
    if self.skipped:
      line += f", skipped {len(self.skipped)} whose outputs were up to date"
    if self.failed:
      line += f"; {len(self.failed)} failed: " + "; ".join(self.failed)
    return line


class PredictionsFailed(JaxsegError):
  """Some images could not be predicted; the others were. `predictions` says which."""

  def __init__(self, predictions: Predictions):
    # A lone image's own one-line error says all; with several, the summary lists them.
    single = len(predictions.images) == 1
    super().__init__(predictions.failed[0] if single else predictions.summary())
    self.predictions = predictions


def _is_image_name(name: str) -> bool:
  # Hidden files are left out: predict's own temporary files and manifests among them.
  return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _read_manifest(folder: str) -> dict[str, dict]:
  """{output file name: {"image": its image relative to `folder`, "settings": fingerprint,
  or None while not yet written}} of `folder`'s manifest; {} without one."""
  path = os.path.join(folder, PREDICT_MANIFEST)
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except FileNotFoundError:
    return {}
  except (OSError, ValueError) as e:
    raise JaxsegError(f"{path}: unreadable predict manifest ({first_line(e)}); delete it (the "
                      "outputs it listed then need --overwrite)") from None
  if not (isinstance(manifest, dict) and manifest.get("version") == 1
          and isinstance(manifest.get("outputs"), dict)):
    raise JaxsegError(f"{path}: not a jaxseg predict manifest (version 1); delete it (the "
                      "outputs it listed then need --overwrite)")
  return manifest["outputs"]


def _write_atomically(path: str, write: Callable[[Any], None]) -> None:
  """`write(binary file)` into a hidden temporary file beside `path`, then a rename: a crash
  leaves the old file (or none) and a hidden .tmp (removed by the next run), never half of
  `path`."""
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                             dir=os.path.dirname(path))
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def _write_manifest(folder: str, outputs: dict[str, dict]) -> None:
  path = os.path.join(folder, PREDICT_MANIFEST)
  text = json.dumps({"version": 1, "outputs": outputs}, indent=1, sort_keys=True)
  try:
    _write_atomically(path, lambda f: f.write(text.encode()))
  except OSError as e:  # a full disk: one line, not a traceback (it may run in a `finally`)
    raise JaxsegError(f"could not write {path}: {first_line(e)}") from None


def _remove_stale_temporaries(folder: str, ours: dict[str, dict]) -> None:
  """The hidden .NAME.XXXX.tmp files a killed predict left of its own outputs."""
  for name in os.listdir(folder):
    if name.startswith(".") and name.endswith(".tmp"):
      target = name[1:-len(".tmp")].rsplit(".", 1)[0]
      if target in ours or target == PREDICT_MANIFEST:
        with contextlib.suppress(OSError):
          os.remove(os.path.join(folder, name))


def _gather_images(paths: Sequence[str], input_dir: str | None) -> list[tuple[str, str | None]]:
  """(image path, the --input_dir it was found under or None) for the files, globs and folder
  given, in that order, each image once. Files an earlier predict wrote are left out: a glob
  or folder that holds the last run's outputs would otherwise predict them too."""
  found = []
  for path in paths:
    if os.path.isfile(path):
      found.append((path, None))
    elif os.path.isdir(path):
      raise JaxsegError(f"{path} is a folder: pass --input_dir={path} to predict the images "
                        "under it")
    elif any(c in path for c in "*?["):  # a glob the shell did not expand (it was quoted)
      matches = sorted(m for m in glob.glob(path, recursive=True)
                       if os.path.isfile(m) and _is_image_name(os.path.basename(m)))
      if not matches:
        raise JaxsegError(f"{path}: no image file ({' '.join(IMAGE_SUFFIXES)}) matches")
      found += [(m, None) for m in matches]
    else:
      raise JaxsegError(f"{path}: no such image file")
  if input_dir is not None:
    if not os.path.isdir(input_dir):
      raise JaxsegError(f"--input_dir={input_dir} is not a folder")
    walked = []
    for folder, dirs, files in os.walk(input_dir):
      dirs[:] = [d for d in dirs if not d.startswith(".")]
      walked += [os.path.join(folder, f) for f in files if _is_image_name(f)]
    found += [(path, input_dir) for path in sorted(walked)]  # sorted: the same order always
    if not walked:
      raise JaxsegError(f"--input_dir={input_dir}: no images ({' '.join(IMAGE_SUFFIXES)}) under "
                        "it")
  images, seen, manifests, ours = [], set(), {}, 0
  for path, root in found:
    real = os.path.realpath(path)
    if real in seen:
      continue
    seen.add(real)
    folder, name = os.path.split(os.path.abspath(path))
    if folder not in manifests:
      manifests[folder] = _read_manifest(folder)
    if name in manifests[folder]:
      ours += 1
      continue
    images.append((path, root))
  if ours:
    logging.info("predict: left out %d file(s) an earlier predict wrote (listed in %s)", ours,
                 PREDICT_MANIFEST)
  if not images:
    raise JaxsegError("no images given: every file given is an output of an earlier predict")
  return images


def _output_bases(images: Sequence[tuple[str, str | None]], out_dir: str | None) -> list[str]:
  """Each image's output base B (it writes B_labels.png, B_mask.png, B_overlay.png), unique.

  B is FOLDER/STEM: the image's own folder, or `out_dir` (under which an --input_dir image keeps
  its folder's path relative to --input_dir), and the image's name without its extension.
  Images that would share a B are told apart, the same way every time:
  1. the same folder and stem (a/y.jpg, a/y.png): the whole file name (y.jpg_labels.png);
  2. still the same (a/x.jpg, b/x.jpg into one out_dir): subfolders, the images' folders
     relative to their common folder (out/a/x_labels.png, out/b/x_labels.png).
  """
  def folder_of(path, root):
    if out_dir is None:
      return os.path.dirname(os.path.abspath(path))
    if root is None:
      return out_dir
    return os.path.normpath(os.path.join(out_dir, os.path.relpath(
        os.path.dirname(os.path.abspath(path)), os.path.abspath(root))))

  keys = [(folder_of(p, r), os.path.splitext(os.path.basename(p))[0]) for p, r in images]

  def clashing():
    counts = collections.Counter(keys)
    return [i for i, key in enumerate(keys) if counts[key] > 1]

  for i in clashing():
    keys[i] = (keys[i][0], os.path.basename(images[i][0]))
  groups = collections.defaultdict(list)
  for i in clashing():
    groups[keys[i]].append(i)
  for (folder, _), members in groups.items():
    dirs = [os.path.dirname(os.path.abspath(images[i][0])) for i in members]
    common = os.path.commonpath(dirs)
    for i, d in zip(members, dirs):
      keys[i] = (os.path.normpath(os.path.join(folder, os.path.relpath(d, common))),
                 os.path.splitext(os.path.basename(images[i][0]))[0])
  bases = [os.path.join(folder, stem) for folder, stem in keys]
  inputs = {os.path.abspath(p): p for p, _ in images}
  owner = {}
  for (path, _), base in zip(images, bases):
    other = owner.setdefault(base, path)
    if other != path:  # only where the rules above run out (e.g. a file named y.jpg.png)
      raise JaxsegError(f"{other} and {path} would both write {base}_labels.png; predict them "
                        "with different --out_dir")
    for kind in OUTPUT_KINDS:
      if f"{base}_{kind}.png" in inputs:
        raise JaxsegError(f"{inputs[f'{base}_{kind}.png']} is an input image and where {path}'s "
                          f"{kind} would go; pass --out_dir to write elsewhere")
  return bases


def _refuse_unknown_files(bases: Sequence[str], manifests: dict, overwrite: bool) -> None:
  """One line naming the first existing output file predict did not write, unless
  `overwrite`: a user's file is never replaced without being asked."""
  unknown = []
  for base in bases:
    folder = os.path.dirname(base)
    for kind in OUTPUT_KINDS:
      target = f"{base}_{kind}.png"
      if os.path.isdir(target):
        raise JaxsegError(f"{target} is a folder where predict writes a file; move it or pass "
                          "--out_dir")
      if os.path.lexists(target) and os.path.basename(target) not in manifests[folder]:
        unknown.append(target)
  if unknown and not overwrite:
    more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
    raise JaxsegError(f"{unknown[0]} exists and predict did not write it{more}; pass "
                      "--overwrite to replace it, or --out_dir to write elsewhere")


def _settings(model, members, tta: TTA, window, alpha: float) -> str:
  """A fingerprint of what the outputs depend on besides the image: the run(s), checkpoint,
  test mode and alpha. An output made otherwise is predicted again, not skipped."""
  weights = model.weights if isinstance(model, Ensemble) else [1.0]
  described = {
      "runs": [[os.path.abspath(getattr(m, "workdir", "") or ""), getattr(m, "step", None),
                getattr(m, "weights_source", None), w] for m, w in zip(members, weights)],
      "tta": [list(tta.scales), tta.flip], "alpha": float(alpha),
      "window": window if window is None or isinstance(window, str) else list(window)}
  return hashlib.sha1(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def _up_to_date(path: str, base: str, manifest: dict, settings: str) -> bool:
  """Whether the image's three outputs exist, were written by predict from this image with
  these settings, and are newer than the image (an image replaced since is redone)."""
  try:
    made = os.stat(path).st_mtime_ns
    for kind in OUTPUT_KINDS:
      target = f"{base}_{kind}.png"
      entry = manifest.get(os.path.basename(target)) or {}
      if (entry.get("image") != os.path.relpath(os.path.abspath(path), os.path.dirname(base))
          or entry.get("settings") != settings or os.stat(target).st_mtime_ns < made):
        return False
  except OSError:
    return False
  return True


def _prepare(paths, out_dir, input_dir, overwrite):
  """(images, their output bases, {output folder: its manifest}), once every output folder
  is writable and no file predict did not write is in the way (unless `overwrite`)."""
  if not paths and input_dir is None:
    raise JaxsegError("no images given: python -m experiments.predict --workdir=RUN IMAGE... "
                      "(or --input_dir=DIR)")
  images = _gather_images(paths, input_dir)
  bases = _output_bases(images, None if out_dir is None else os.path.abspath(out_dir))
  folders = sorted({os.path.dirname(b) for b in bases})
  for folder in folders:
    ensure_writable(folder, "out_dir" if out_dir else "out_dir (default: beside each image)")
    check_not_locked(folder, "out_dir")
  manifests = {folder: _read_manifest(folder) for folder in folders}
  _refuse_unknown_files(bases, manifests, overwrite)
  return images, bases, manifests


def plan_predictions(paths: Sequence[str] = (), *, out_dir: str | None = None,
                     input_dir: str | None = None,
                     overwrite: bool = False) -> list[tuple[str, str]]:
  """(image, output base B: it gets B_labels.png, B_mask.png, B_overlay.png) for each image
  `export_predictions` would take, after the same checks; nothing is computed. The command
  line calls it before restoring the model, so that a mistake is reported at once."""
  images, bases, _ = _prepare(paths, out_dir, input_dir, overwrite)
  return [(path, base) for (path, _), base in zip(images, bases)]


BUCKETS = ("auto", "yes", "no")
BUCKET_AFTER = 8  # image sizes in one call past which "auto" pads to buckets


def _probed_size(path: str) -> tuple[int, int] | None:
  """(h, w) from the file's header; None where it cannot be read (the read names it later)."""
  try:
    return tuple(probe_array(path).size)
  except (BadExample, OSError, ValueError):
    return None


def _read_ahead(todo, rgb8: bool, depth: int):
  """((path, base), image or the exception reading it) for `todo` in order, read by two
  threads up to `depth` images ahead: decoding overlaps the device's work."""
  def read(path):
    try:
      # 8-bit RGB runs take any picture (grey, palette, 16-bit: as 8-bit RGB); others the
      # file's own bands and values.
      return read_image(path) if rgb8 else read_array(path)
    except (BadExample, MemoryError) as e:
      return e

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    ahead = collections.deque()
    for item in todo:
      ahead.append((item, pool.submit(read, item[0])))
      if len(ahead) > depth:
        item, future = ahead.popleft()
        yield item, future.result()
    while ahead:
      item, future = ahead.popleft()
      yield item, future.result()


def _frozen(model, members):
  """(model, members) with each CNN's weights compiled in as constants (`Run.frozen`): 1.3x
  the images/s of DeepLabV3+ ResNet-50 on XLA:CPU, where the compiler folds them."""
  members = [m.frozen() if isinstance(m, runs.Run) else m for m in members]
  if isinstance(model, Ensemble):
    return Ensemble(members, model.weights), members
  return members[0], members


def export_predictions(model, paths: Sequence[str] = (), *, out_dir: str | None = None,
                       tta: TTA = NO_TTA, window="default", alpha: float = 0.5,
                       input_dir: str | None = None, overwrite: bool = False,
                       batch_size: int = 8, bucket: str = "auto") -> Predictions:
  """For each image writes NAME_labels.png (raw class ids, 8-bit grey), NAME_mask.png (the
  classes in the palette's colours) and NAME_overlay.png (the mask blended over the image),
  next to it or into `out_dir`; names are made unique as `_output_bases` says.

  `paths` are image files or globs; `input_dir` adds every image under it (recursively, with
  its relative path kept under `out_dir`). Nothing is computed until every output folder is
  writable and no file predict did not write (its manifest says) would be replaced, unless
  `overwrite`. Images whose outputs are up to date are skipped, so a rerun finishes what a
  killed one left. An image that cannot be read or predicted is logged and the rest are done;
  then `PredictionsFailed` names them all.

  Images go `batch_size` at a time, sharded over every device (the batch is filled up to a
  multiple of the device count), sorted by size so that images of one size fill batches.
  `bucket` "yes" pads each image at the bottom and right to its bucket
  (`tiling.bucket_size`: a few sizes), zero after normalisation, so that a folder of many
  sizes compiles a few programs; the padding can change a prediction near the padded edges
  (and, through DeepLab's image pooling, slightly everywhere). "auto" does so only for more
  than `BUCKET_AFTER` sizes; "no" never. The GNN (superpixels of the whole image) takes each
  size as it is.

  `window` "default" is the sliding window the run's dataset is evaluated with, or whole
  images, except that images over twice the run's training size go by windows of that size
  (whole, they can take more memory than any device has); None is whole images always."""
  if batch_size < 1:
    raise JaxsegError(f"--batch_size={batch_size} must be at least 1")
  if bucket not in BUCKETS:
    raise JaxsegError(f"--bucket={bucket} is not one of: {', '.join(BUCKETS)}")
  images, bases, manifests = _prepare(paths, out_dir, input_dir, overwrite)
  folders = sorted(manifests)
  if model.num_classes > 256:
    raise JaxsegError(f"{model.num_classes} classes do not fit an 8-bit label PNG")
  members = model.members if isinstance(model, Ensemble) else [model]
  first = members[0]
  settings = _settings(model, members, tta, window, alpha)
  if jax.default_backend() == "cpu":
    model, members = _frozen(model, members)
  result = Predictions([path for path, _ in images])
  todo = []
  for (path, _), base in zip(images, bases):
    if _up_to_date(path, base, manifests[os.path.dirname(base)], settings):
      result.skipped.append(path)
    else:
      todo.append((path, base))
  if result.skipped:
    logging.info("predict: skipping %d image(s) whose outputs are up to date",
                 len(result.skipped))
  # The outputs about to be written are listed as predict's (settings None: not yet done)
  # before any is written, so that a kill at any point leaves none a rerun would refuse.
  for folder in folders:
    _remove_stale_temporaries(folder, manifests[folder])
  claimed = set()
  for path, base in todo:
    folder = os.path.dirname(base)
    for kind in OUTPUT_KINDS:
      manifests[folder][os.path.basename(f"{base}_{kind}.png")] = {
          "image": os.path.relpath(os.path.abspath(path), folder), "settings": None}
    claimed.add(folder)
  for folder in sorted(claimed):
    _write_manifest(folder, manifests[folder])

  default_window = None
  if window == "default":
    default_window = from_config.eval_settings(first.config, model.classes.ignore_index)[0]
  crops = [c for c in map(runs.training_size, members) if c] if window == "default" else []
  crop = (min(c[0] for c in crops), min(c[1] for c in crops)) if crops else None
  told = []

  def window_for(path, shape):
    if window != "default":
      return window
    if default_window is not None or crop is None:
      return default_window
    if shape[0] > 2 * crop[0] or shape[1] > 2 * crop[1]:
      if not told:
        told.append(path)
        logging.info("predict: %s is %dx%d, over twice the %dx%d images the run trained on: "
                     "images that large go by %dx%d sliding window (--window=0: whole)",
                     path, shape[0], shape[1], *crop, *crop)
      return crop
    return None

  palette = model.classes.palette
  bands = first.config.data.get("display_bands")
  rgb8 = (model.in_channels, model.image_dtype) == (3, "uint8")
  dirty, last_save = set(), [time.monotonic()]

  def save_manifests(now: bool):
    if dirty and (now or time.monotonic() - last_save[0] > _MANIFEST_EVERY_S):
      for folder in sorted(dirty):
        _write_manifest(folder, manifests[folder])
      dirty.clear()
      last_save[0] = time.monotonic()

  def fail(path, error):
    message = error if isinstance(error, str) else first_line(error)
    message = message if message.startswith(f"{path}:") else f"{path}: {message}"
    logging.warning("predict: %s", message)
    result.failed.append(message)

  def write(path, base, image, labels):
    folder = os.path.dirname(base)
    outputs = {"labels": labels, "mask": visualize.colorize(labels, palette),
               "overlay": visualize.overlay(visualize.as_rgb(image[None], bands)[0], labels,
                                            palette, alpha=alpha)}
    for kind, array in outputs.items():
      target = f"{base}_{kind}.png"
      try:
        _write_atomically(target, lambda f, a=array: Image.fromarray(a).save(f, format="PNG"))
      except OSError as e:
        fail(path, f"could not write {target}: {first_line(e)}")
        return
      result.written.append(target)
    for kind in OUTPUT_KINDS:
      manifests[folder][os.path.basename(f"{base}_{kind}.png")]["settings"] = settings
    dirty.add(folder)
    save_manifests(now=False)

  probed = {path: _probed_size(path) for path, _ in todo}
  sizes_seen = {size for size in probed.values() if size}
  bucket = (bucket == "yes" or bucket == "auto" and len(sizes_seen) > BUCKET_AFTER) and not any(
      isinstance(m, runs.GraphRun) for m in members)
  mesh = sharding.make_mesh()
  devices = mesh.devices.size

  def shape_of(h, w):
    return (tiling.bucket_size(h), tiling.bucket_size(w)) if bucket else (h, w)

  weights = model.weights if isinstance(model, Ensemble) else [1.0]
  # Whole-image test-time views need the whole image's scores; windows alone can go by bands.
  tiles = tta.num_views == 1 and all(isinstance(m, runs.Run) for m in members)

  def run(group):
    """Predicts `group`, images of one bucket (or shape), as one batch over every device."""
    first_image = group[0][2]
    shape = shape_of(*first_image.shape[:2])
    size = window_for(group[0][0], first_image.shape)
    try:
      if tiles and size is not None and (first_image.shape[0] > size[0] or
                                         first_image.shape[1] > size[1]):
        write(group[0][0], group[0][1], first_image,
              tiling.tiled_labels(members, weights, first_image, size, batch_size, mesh))
        return
      rows = len(group) if len(group) == 1 else -(-len(group) // devices) * devices
      batch = np.zeros((rows, *shape, first_image.shape[-1]), first_image.dtype)
      sizes = np.zeros((rows, 2), np.int32)
      for i, (_, _, image) in enumerate(group):
        batch[i, :image.shape[0], :image.shape[1]] = image
        sizes[i] = image.shape[:2]
      padded = {"sizes": sizes} if bucket else {}
      if rows % devices == 0:
        batch = jax.device_put(batch, sharding.batch_sharding(mesh))
        padded = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in padded.items()}
      probabilities = model.probabilities(batch, tta=tta, window=size, **padded)
      labels = np.asarray(jnp.argmax(probabilities, -1).astype(jnp.uint8))
    except (JaxsegError, MemoryError, jax.errors.JaxRuntimeError) as e:  # e.g. out of memory
      if len(group) > 1:  # again one at a time, so that the error names its image
        for one in group:
          run([one])
      else:
        fail(group[0][0], e)
      return
    for (path, base, image), image_labels in zip(group, labels):
      write(path, base, image, image_labels[:image.shape[0], :image.shape[1]])

  if bucket:
    logging.info("predict: %d image sizes, padded to %d size buckets (--bucket=no: each size as "
                 "it is)", len(sizes_seen), len({shape_of(*size) for size in sizes_seen}))
  # Neighbours of one size (bucket) fill batches; unreadable headers go last (named there).
  todo.sort(key=lambda item: (0, *shape_of(*probed[item[0]])) if probed[item[0]] else (1, 0, 0))
  pending = []  # (path, base, image) of consecutive images of one bucket: the next batch
  try:
    for (path, base), image in tqdm.tqdm(_read_ahead(todo, rgb8, depth=2 * batch_size),
                                         total=len(todo), desc="predict", unit="image",
                                         dynamic_ncols=True, disable=len(todo) < 2):
      if isinstance(image, Exception):
        fail(path, image)
        continue
      if (image.shape[-1], image.dtype.name) != (model.in_channels, model.image_dtype):
        fail(path, f"{path}: image has {image.shape[-1]} channel(s) of {image.dtype.name} but "
                   f"the model takes {model.in_channels} of {model.image_dtype}")
        continue
      size = window_for(path, image.shape)
      # A sliding window already batches its windows: such an image goes alone.
      limit = 1 if size is not None and (image.shape[0] > size[0] or
                                         image.shape[1] > size[1]) else batch_size
      if pending and shape_of(*pending[0][2].shape[:2]) != shape_of(*image.shape[:2]):
        run(pending)
        pending = []
      pending.append((path, base, image))
      if len(pending) >= limit:
        run(pending)
        pending = []
    if pending:
      run(pending)
  finally:
    save_manifests(now=True)
  if result.failed:
    raise PredictionsFailed(result)
  return result
