"""Where an experiment's `config.data` section becomes datasets, loaders and evaluation settings.

The one place that reads the data keys of a config (documented in the README's Configuration
section); the training loops, `jaxseg.evaluate` and `experiments.*` call it, and everything it
calls takes plain arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import numpy as np

from jaxseg.data import (channels, dataset_spec, generated, get_dataset, pipeline, sources,
                         stats, transforms)
from jaxseg.errors import JaxsegError


@dataclasses.dataclass
class Data:
  """The sources, the training loader and how to evaluate, resolved from `config.data`."""
  train: Any
  val: Any
  loader: Any
  image_shape: tuple[int, int, int]  # what the model is initialised with
  eval_window: tuple[int, int] | None
  eval_operations: tuple
  skip_log: str
  # None: 8-bit RGB, normalised as the model expects (a pretrained backbone's preprocessing or
  # ImageNet's); else {"channels": "any", "mean": [...], "std": [...]}, one entry per channel.
  normalization: dict | None = None
  statistics: Callable[[], dict] | None = None  # the train split's, computed at most once


def _pair(value, key: str, cast=int):
  """A (h, w)-like config value as a tuple; one number means both."""
  if value is None:
    return None
  values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
  values = values * 2 if len(values) == 1 else values
  if len(values) != 2:
    raise JaxsegError(f"--config.data.{key}={value} must be two numbers")
  return tuple(cast(v) for v in values)


def make_source(config, split: str):
  """The `split` of `config.data`'s dataset: name, data_dir and the reader's options."""
  spec = dataset_spec(config.data.name)
  chosen = {k: v for k, v in config.data.options.to_dict().items() if v is not None}
  options = {"image_size": config.data.image_size, "seed": config.data.seed,
             "preset": config.data.preset, "skip_bad_examples": config.data.skip_bad_examples,
             "val_fraction": config.data.get("val_fraction", 0.1), **chosen}
  unknown = sorted(set(chosen) - set(spec.options))
  if unknown:
    takes = [k for k in spec.options if k in config.data.options]
    raise JaxsegError(f"--config.data.options.{unknown[0]}: dataset {config.data.name} takes "
                      f"{', '.join(f'data.options.{k}' for k in takes) or 'no options'}")
  kwargs = {k: v for k, v in options.items() if k in spec.options}
  return get_dataset(config.data.name, split, data_dir=config.data.data_dir or None, **kwargs)


def make_sources(config):
  """(train, val) sources of `config.data`; train is cut to data.num_train_examples and
  joined by data.extra_train_dir's pairs."""
  train = make_source(config, config.data.get("train_split", "train"))
  val = make_source(config, config.data.val_split)
  first = config.data.get("num_train_examples") or 0
  if first < 0:
    raise JaxsegError(f"--config.data.num_train_examples={first} must be at least 0 (0: the "
                      "whole split)")
  if first:
    train = sources.Subset(train, first)
  if config.data.get("extra_train_dir"):
    extra = generated.GeneratedPairs(config.data.extra_train_dir)
    fraction = config.data.get("extra_train_fraction") or 0.0
    train = (sources.Mixture(train, extra, fraction) if fraction
             else sources.ConcatSource([train, extra]))
  return train, val


def eval_settings(config, ignore_index: int):
  """(sliding window (h, w) or None for whole images, per-example eval operations) of
  data.eval_window / data.eval_size or the dataset's defaults."""
  spec = dataset_spec(config.data.name)
  window = _pair(config.data.get("eval_window"), "eval_window") or spec.eval_window
  window = None if window == (0, 0) else window  # (0, 0): whole images
  eval_size = _pair(config.data.get("eval_size"), "eval_size") or spec.eval_size
  for key, value in (("eval_window", window), ("eval_size", eval_size)):
    if value is not None and min(value) < 1:
      raise JaxsegError(f"--config.data.{key}={value} must be positive"
                        + (" (or (0, 0) for whole images)" if key == "eval_window" else ""))
  return window, ((transforms.PadTo(eval_size, ignore_index),) if eval_size else ())


NORMALIZE = ("auto", "dataset", "imagenet")


def check_channels(config, source) -> int:
  """The channel count of `source`'s images, checked against data.in_channels when set."""
  c, dtype = channels(source)
  wanted = config.data.get("in_channels")
  if wanted and wanted != c:
    raise JaxsegError(f"--config.data.in_channels={wanted}, but {source!r} has {c}-channel "
                      f"{dtype.name} images")
  return c


def normalization(config, train, statistics: Callable[[], dict]) -> dict | None:
  """How images become model inputs (see `Data.normalization`).

  data.mean / data.std given: those. Otherwise data.normalize: "auto" keeps the model's usual
  normalisation for 8-bit RGB (what a pretrained backbone's filters expect) and uses the train
  split's own per-channel statistics for anything else (grey, 16-bit, float, multi-band);
  "dataset" uses them for RGB too; "imagenet" needs 8-bit RGB.
  """
  c, dtype = channels(train)
  mode = config.data.get("normalize", "auto")
  if mode not in NORMALIZE:
    raise JaxsegError(f"--config.data.normalize={mode} is not one of: {', '.join(NORMALIZE)}")
  mean, std = config.data.get("mean"), config.data.get("std")
  if mean or std:
    for key, value in (("mean", mean), ("std", std)):
      if not value or len(value) != c:
        raise JaxsegError(f"--config.data.{key}={value}: give data.mean and data.std with one "
                          f"number per channel ({c})")
    if min(std) <= 0:
      raise JaxsegError(f"--config.data.std={std} must be positive")
    return {"channels": "any", "mean": [float(v) for v in mean],
            "std": [float(v) for v in std]}
  rgb8 = c == 3 and dtype == np.uint8
  if mode == "imagenet" and not rgb8:
    raise JaxsegError(f"--config.data.normalize=imagenet needs 8-bit RGB images; {train!r} has "
                      f"{c}-channel {dtype.name} ones")
  if mode == "imagenet" or (mode == "auto" and rgb8):
    return None
  computed = statistics()
  # A constant band (a padding channel, an empty mask band) has std 0: it is centred only.
  return {"channels": "any", "mean": computed["mean"],
          "std": [s if s > 1e-6 else 1.0 for s in computed["std"]]}


def make_data(config, workdir: str, local_batch: int) -> Data:
  """Dataset defaults (data.DATASETS) overridden by the data.* config keys."""
  spec = dataset_spec(config.data.name)
  train, val = make_sources(config)
  in_channels = check_channels(config, train)
  if channels(val) != channels(train):
    raise JaxsegError(f"{val!r} has {channels(val)[0]}-channel {channels(val)[1].name} images "
                      f"but {train!r} has {in_channels}-channel {channels(train)[1].name} ones")
  bands = config.data.get("display_bands")
  if bands and (len(bands) not in (1, 3) or not all(0 <= int(b) < in_channels for b in bands)):
    raise JaxsegError(f"--config.data.display_bands={tuple(bands)}: give 1 or 3 band indices "
                      f"in 0..{in_channels - 1}")
  statistics = functools.cache(lambda: stats.cached(train, workdir))
  ignore = train.ignore_index
  crop = _pair(config.data.crop_size, "crop_size") or spec.crop_size
  if crop is None and spec.crop_from_data:
    sizes = getattr(train, "image_sizes", None)  # from the headers: nothing decoded
    crop = tuple(sizes[0]) if sizes else tuple(np.asarray(train[0]["label"]).shape)
  scales = _pair(config.data.scale_range, "scale_range", float) or spec.scale_range
  if crop is not None and min(crop) < 1:
    raise JaxsegError(f"--config.data.crop_size={crop} must be positive")
  window, eval_operations = eval_settings(config, ignore)
  val_sizes = sorted(set(getattr(val, "image_sizes", None) or ()))
  if not eval_operations and len(val_sizes) > 1:
    # Val images batch together (whole or by window) only when they share a size: say so
    # before training.
    raise JaxsegError(f"{val!r}: val images differ in size ({val_sizes[0]}, {val_sizes[-1]} "
                      "HxW, ...); set --config.data.eval_size=H,W to a canvas that holds the "
                      "largest (padding is ignored)")
  skip_log = os.path.join(workdir, "skipped_examples.jsonl")
  operations = [pipeline.DropBadExamples(skip_log)]
  if crop is not None:
    operations.append(transforms.Augment(crop, scales[0], scales[1], flip=config.data.flip,
                                         ignore_index=ignore,
                                         **({} if config.data.photometric else
                                            dict(brightness=0, contrast=0, saturation=0,
                                                 hue=0))))
  # After the crop: the same check on a fraction of the pixels (resampling is nearest, so it
  # cannot create label values, and a bad value outside every crop never reaches a step).
  operations.append(pipeline.ValidateLabels(train.num_classes, ignore, repr(train)))
  loader = pipeline.train_loader(train, batch_size=local_batch, seed=config.train.seed,
                                 operations=operations, worker_count=config.data.worker_count)
  image_shape = (*crop, in_channels) if crop else tuple(np.asarray(train[0]["image"]).shape)
  return Data(train, val, loader, image_shape, window, eval_operations, skip_log,
              normalization(config, train, statistics), statistics)


