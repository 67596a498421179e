"""Sources made of sources: the first n examples of one, and several one after another.

A source is what the readers return: `len`, `source[i]` -> {"image", "label", ...}, and the
class metadata (class_names, num_classes, palette, ignore_index).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxseg.data.files import BAD_KEY
from jaxseg.errors import JaxsegError


class Subset:
  """The first `n` examples of a source, with its class metadata (`data.num_train_examples`:
  the synthetic train split is procedural, 100,000 images; a low-data experiment takes a few)."""

  def __init__(self, source, n: int):
    self.source, self.n = source, min(n, len(source))

  def __len__(self):
    return self.n

  def __getitem__(self, index):
    if not 0 <= index < self.n:
      raise IndexError(index)
    return self.source[index]

  def __getattr__(self, name):  # class_names, num_classes, palette, ignore_index...
    if name == "source":  # not set yet (unpickling): no recursion
      raise AttributeError(name)
    return getattr(self.source, name)

  def __repr__(self):
    return f"{self.source!r}[:{self.n}]"


class ConcatSource:
  """`sources` one after another, with the first one's class metadata (all must agree);
  examples are {"image", "label"}."""

  def __init__(self, sources: Sequence):
    self.sources = list(sources)
    first = self.sources[0]
    for other in self.sources[1:]:
      if tuple(other.class_names) != tuple(first.class_names):
        raise JaxsegError(f"{other!r} has classes {tuple(other.class_names)}, but {first!r} "
                          f"has {tuple(first.class_names)}")
    self.class_names, self.palette = first.class_names, first.palette
    self.ignore_index, self.num_classes = first.ignore_index, first.num_classes
    self._ends = np.cumsum([len(s) for s in self.sources])

  def __len__(self):
    return int(self._ends[-1])

  def __getitem__(self, index):
    if not 0 <= index < len(self):
      raise IndexError(index)
    which = int(np.searchsorted(self._ends, index, side="right"))
    offset = int(self._ends[which - 1]) if which else 0
    example = self.sources[which][index - offset]
    if BAD_KEY in example:
      return example
    # The sources' extra keys differ (a file name, the synthetic's parameters); a batch needs
    # one structure.
    return {"image": example["image"], "label": example["label"]}

  def __repr__(self):
    return " + ".join(repr(s) for s in self.sources)
