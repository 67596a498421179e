"""Datasets: a registry of sources, each a grain RandomAccessDataSource with class metadata.

Every source yields {"image": (H, W, C), "label": uint8 (H, W)} and exposes
`class_names`, `num_classes`, `palette` (uint8 (K, 3)) and `ignore_index`. Images are uint8 RGB
(C = 3) except in folder datasets, whose sources also say `in_channels` and `image_dtype`
(uint8, uint16 or float32; see `channels`). Each registered
dataset also carries its training defaults (crop size, scale range, how to evaluate), which an
experiment's `data.*` config keys override.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

from jaxseg.data import prepared
from jaxseg.data.ade20k import ADE20K
from jaxseg.data.camvid import CamVid
from jaxseg.data.cityscapes import Cityscapes
from jaxseg.data.coco import CocoSegmentation
from jaxseg.data.files import channels
from jaxseg.data.folder import FolderDataset
from jaxseg.data.synthetic import SyntheticShapes
from jaxseg.data.voc import PascalVOC
from jaxseg.errors import JaxsegError


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How to build a dataset's splits and its training/evaluation defaults.

  `crop_size` None means no augmentation (the synthetic data is generated at the training
  size). `eval_window` (h, w) evaluates by sliding window; None runs whole images.
  `eval_size` pads every val image to one canvas (datasets whose images differ in size).
  """

  factory: Callable
  options: tuple[str, ...] = ()  # the factory's keyword arguments that config may set
  crop_size: tuple[int, int] | None = None
  scale_range: tuple[float, float] = (0.5, 2.0)
  eval_window: tuple[int, int] | None = None
  eval_size: tuple[int, int] | None = None
  on_disk: bool = True
  crop_from_data: bool = False  # crop_size unset: the size of the first train image


def _synthetic(split: str, *, image_size, seed: int = 0, num_examples=None,
               preset: str = "default"):
  return SyntheticShapes(split, image_size=image_size, seed=seed, num_examples=num_examples,
                         preset=preset)


DATASETS: dict[str, DatasetSpec] = {
    "synthetic": DatasetSpec(_synthetic, ("image_size", "seed", "num_examples", "preset"),
                             on_disk=False),
    # SegNet's setting: whole 360x480 frames.
    "camvid": DatasetSpec(CamVid, ("skip_bad_examples",), crop_size=(360, 480)),
    # DeepLabV3+'s 512x1024 crops of the 1024x2048 frames; evaluated by sliding window.
    "cityscapes": DatasetSpec(Cityscapes, ("skip_bad_examples",), crop_size=(512, 1024),
                              eval_window=(512, 1024)),
    # COCO images are at most 640 on a side and differ in size: crops of 512 for training,
    # whole images padded to one 640x640 canvas (padding ignored) for evaluation.
    # Your own data: crops the size of the first train image (so images of other sizes still
    # batch), whole val images.
    "folder": DatasetSpec(FolderDataset, ("val_fraction", "seed", "skip_bad_examples"),
                          crop_from_data=True),
    # Pascal VOC 2012 (train_aug: + SBD): mmseg's and DeepLab's 512x512 crops; val images are
    # at most 500 on a side, padded to one 512x512 canvas.
    "voc": DatasetSpec(PascalVOC, ("sbd_dir", "skip_bad_examples"), crop_size=(512, 512),
                       eval_size=(512, 512)),
    # ADE20K SceneParsing: mmseg's 512x512 crops, evaluated by 512x512 sliding window; val
    # images differ in size, so data.eval_size must be set to a canvas that holds the largest.
    "ade20k": DatasetSpec(ADE20K, ("skip_bad_examples",), crop_size=(512, 512),
                          eval_window=(512, 512)),
    "coco": DatasetSpec(CocoSegmentation,
                        ("classes", "labels", "min_labelled_area", "skip_bad_examples"),
                        crop_size=(512, 512), eval_size=(640, 640)),
}


def get_dataset(name: str, split: str, *, data_dir: str | None = None, **kwargs):
  """The `split` of dataset `name` as a random-access source.

  On-disk datasets read `data_dir`; a directory written by `python -m jaxseg.data.prepare`
  for this dataset is read in its prepared form (its bad examples were dealt with when it was
  written; other options must match the ones it was prepared with).
  """
  spec = dataset_spec(name)
  if not spec.on_disk:
    return spec.factory(split, **kwargs)
  if not data_dir:
    raise JaxsegError(f"dataset {name} is read from disk: pass --data_dir=PATH")
  if prepared.is_prepared(data_dir, dataset=name):
    source = prepared.PreparedSource(data_dir, split, dataset=name)
    kwargs.pop("skip_bad_examples", None)
    source.check_options(kwargs, {k: p.default for k, p in
                                  inspect.signature(spec.factory).parameters.items()
                                  if p.default is not p.empty})
    return source
  return spec.factory(split, data_dir=data_dir, **kwargs)


def dataset_spec(name: str) -> DatasetSpec:
  if name not in DATASETS:
    raise JaxsegError(f"unknown dataset {name!r}; valid choices: {', '.join(sorted(DATASETS))}")
  return DATASETS[name]


__all__ = ["DATASETS", "DatasetSpec", "channels", "dataset_spec", "get_dataset", "ADE20K", "CamVid",
           "Cityscapes", "CocoSegmentation", "FolderDataset", "PascalVOC", "SyntheticShapes"]
