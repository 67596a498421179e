"""Datasets: a registry of sources, each a grain RandomAccessDataSource with class metadata.

Every source yields {"image": uint8 (H, W, 3), "label": uint8 (H, W)} and exposes
`class_names`, `num_classes`, `palette` (uint8 (K, 3)) and `ignore_index`.
"""

from __future__ import annotations

from jaxseg.data.synthetic import SyntheticShapes
from jaxseg.errors import JaxsegError


def _synthetic(split: str, *, image_size, seed: int = 0, data_dir=None, num_examples=None,
               preset: str = "default"):
  del data_dir  # generated, nothing to read
  return SyntheticShapes(split, image_size=image_size, seed=seed, num_examples=num_examples,
                         preset=preset)


# name -> factory(split, *, image_size, seed, data_dir, num_examples)
DATASETS = {
    "synthetic": _synthetic,
}


def get_dataset(name: str, split: str, **kwargs):
  """The `split` of dataset `name` as a random-access source."""
  if name not in DATASETS:
    raise JaxsegError(f"unknown dataset {name!r}; valid choices: {', '.join(sorted(DATASETS))}")
  return DATASETS[name](split, **kwargs)


__all__ = ["DATASETS", "get_dataset", "SyntheticShapes"]
