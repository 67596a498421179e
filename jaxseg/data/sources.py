"""Sources made of sources: the first n examples of one, several one after another, and two
interleaved in a given proportion.

A source is what the readers return: `len`, `source[i]` -> {"image", "label", ...}, and the
class metadata (class_names, num_classes, palette, ignore_index).
"""

from __future__ import annotations

import fractions
from typing import Sequence

import numpy as np

from jaxseg.data.files import BAD_KEY, channels
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
    self.in_channels, self.image_dtype = channels(first)
    for other in self.sources[1:]:
      if channels(other) != channels(first):
        raise JaxsegError(f"{other!r} has {channels(other)[0]}-channel {channels(other)[1]} "
                          f"images, but {first!r} has {self.in_channels}-channel "
                          f"{self.image_dtype}")
    self._ends = np.cumsum([len(s) for s in self.sources])

  def __len__(self):
    return int(self._ends[-1])

  def __getitem__(self, index):
    if not 0 <= index < len(self):
      raise IndexError(index)
    which = int(np.searchsorted(self._ends, index, side="right"))
    offset = int(self._ends[which - 1]) if which else 0
    return self._common(self.sources[which][index - offset])

  @staticmethod
  def _common(example):
    if BAD_KEY in example:
      return example
    # The sources' extra keys differ (a file name, the synthetic's parameters); a batch needs
    # one structure.
    return {"image": example["image"], "label": example["label"]}

  def __repr__(self):
    return " + ".join(repr(s) for s in self.sources)


class Mixture(ConcatSource):
  """`main` and `extra` interleaved so that a `fraction` of the examples come from `extra`
  (`data.extra_train_fraction`), whatever the two sizes: 800 generated pairs beside 200 real
  images would otherwise make 80% of every batch generated.

  With the fraction as p/q, position i is `extra`'s when floor((i + 1) p / q) > floor(i p / q):
  evenly spread, deterministic, in integers (floats drop a position: 100 x 0.29 is
  28.999...). The length covers every example of both at least once; the smaller side repeats.
  """

  def __init__(self, main, extra, fraction: float):
    if not 0.0 < fraction < 1.0:
      raise JaxsegError(f"--config.data.extra_train_fraction={fraction} must be in (0, 1) "
                        "(or 0: the extra pairs as many times as the real images)")
    super().__init__([main, extra])
    self.fraction = fraction
    ratio = fractions.Fraction(fraction).limit_denominator(10**6)
    self._p, self._q = ratio.numerator, ratio.denominator
    p, q = self._p, self._q
    self._length = max(-(-len(main) * q // (q - p)), -(-len(extra) * q // p))

  def __len__(self):
    return self._length

  def __getitem__(self, index):
    if not 0 <= index < self._length:
      raise IndexError(index)
    main, extra = self.sources
    before = index * self._p // self._q  # extra positions before this one
    if (index + 1) * self._p // self._q > before:
      return self._common(extra[before % len(extra)])
    return self._common(main[(index - before) % len(main)])

  def __repr__(self):
    return f"Mixture({self.sources[0]!r}, {self.sources[1]!r}, fraction={self.fraction})"
