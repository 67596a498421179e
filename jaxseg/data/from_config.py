"""Where an experiment's `config.data` section becomes datasets, loaders and evaluation settings.

The one place that reads the data keys of a config (documented in the README's Configuration
section); the training loops, `jaxseg.evaluate` and `experiments.*` call it, and everything it
calls takes plain arguments.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from jaxseg.data import dataset_spec, generated, get_dataset, pipeline, sources, transforms
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
             **chosen}
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
  train = make_source(config, "train")
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


def make_data(config, workdir: str, local_batch: int) -> Data:
  """Dataset defaults (data.DATASETS) overridden by the data.* config keys."""
  spec = dataset_spec(config.data.name)
  train, val = make_sources(config)
  ignore = train.ignore_index
  crop = _pair(config.data.crop_size, "crop_size") or spec.crop_size
  scales = _pair(config.data.scale_range, "scale_range", float) or spec.scale_range
  if crop is not None and min(crop) < 1:
    raise JaxsegError(f"--config.data.crop_size={crop} must be positive")
  window, eval_operations = eval_settings(config, ignore)
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
  image_shape = (*crop, 3) if crop else tuple(np.asarray(train[0]["image"]).shape)
  return Data(train, val, loader, image_shape, window, eval_operations, skip_log)


