"""Generated pairs on disk read back exactly, and join a real source for training."""

import os

import numpy as np
import pytest

from jaxseg.data import SyntheticShapes, from_config, pipeline
from jaxseg.data.generated import GeneratedPairs, write_pairs
from jaxseg.data.sources import ConcatSource, Mixture, Subset
from jaxseg.errors import JaxsegError


@pytest.fixture()
def real():
  return SyntheticShapes("val", image_size=32, num_examples=5)


def _write(directory, source, indices, start=0):
  examples = [source[i] for i in indices]
  return write_pairs(str(directory), np.stack([e["image"] for e in examples]),
                     np.stack([e["label"] for e in examples]), class_names=source.class_names,
                     palette=source.palette, start=start)


def test_pairs_read_back_exactly_and_append(tmp_path, real):
  assert _write(tmp_path, real, [0, 1]) == 2
  assert _write(tmp_path, real, [2], start=2) == 3
  pairs = GeneratedPairs(str(tmp_path))
  assert len(pairs) == 3 and pairs.class_names == tuple(real.class_names)
  np.testing.assert_array_equal(pairs.palette, real.palette)
  for i in range(3):
    np.testing.assert_array_equal(pairs[i]["image"], real[i]["image"])
    np.testing.assert_array_equal(pairs[i]["label"], real[i]["label"])
  assert repr(pairs) == f"GeneratedPairs({str(tmp_path)!r}, count=3)"
  assert not [f for _, _, files in os.walk(tmp_path) for f in files if ".tmp-" in f]


def test_concatenation_indexes_both_sources_and_feeds_the_loader(tmp_path, real):
  _write(tmp_path, real, [3, 4])
  both = ConcatSource([real, GeneratedPairs(str(tmp_path))])
  assert len(both) == 7 and both.num_classes == real.num_classes
  np.testing.assert_array_equal(both[4]["image"], real[4]["image"])
  np.testing.assert_array_equal(both[6]["label"], real[4]["label"])  # generated pair 1
  with pytest.raises(IndexError):
    both[7]
  batch = next(iter(pipeline.train_loader(both, batch_size=7, seed=0)))
  assert batch["image"].shape == (7, 32, 32, 3)


def test_mixture_draws_the_given_share_of_extra_examples(tmp_path, real):
  _write(tmp_path, real, [0, 1, 2])
  mixed = Mixture(Subset(SyntheticShapes("train", image_size=32), 10),
                  GeneratedPairs(str(tmp_path)), 0.25)
  # Long enough for every example of both: 10 real need 14 positions at a quarter extra.
  assert len(mixed) == 14
  extra = [i for i in range(len(mixed)) if mixed[i]["image"].tobytes() in
           {real[k]["image"].tobytes() for k in range(3)}]
  assert extra == [3, 7, 11]  # every 4th position, each pair once
  assert repr(mixed).endswith("count=3), fraction=0.25)")
  # 29 pairs at 0.29: in floats, 100 x 0.29 = 28.999... would drop the last pair.
  _write(tmp_path / "many", real, [0] * 29)
  mixed = Mixture(Subset(SyntheticShapes("train", image_size=32), 10),
                  GeneratedPairs(str(tmp_path / "many")), 0.29)
  assert len(mixed) == 100
  assert sum(mixed[i]["image"].tobytes() == real[0]["image"].tobytes() for i in range(100)) == 29
  with pytest.raises(JaxsegError, match=r"extra_train_fraction=1.0 must be in \(0, 1\)"):
    Mixture(real, GeneratedPairs(str(tmp_path)), 1.0)


def test_mismatched_classes_and_missing_files_are_one_line(tmp_path, real):
  write_pairs(str(tmp_path), np.zeros((1, 4, 4, 3), np.uint8), np.zeros((1, 4, 4), np.uint8),
              class_names=("a", "b"), palette=np.zeros((2, 3), np.uint8))
  with pytest.raises(JaxsegError, match=r"has classes \('a', 'b'\), but SyntheticShapes"):
    ConcatSource([real, GeneratedPairs(str(tmp_path))])
  os.remove(tmp_path / "labels" / "000000.png")
  with pytest.raises(JaxsegError, match=r"000000.png: missing \(.*meta.json lists 1 pairs\)"):
    GeneratedPairs(str(tmp_path))
  with pytest.raises(JaxsegError, match=r"meta.json: missing \(not a directory of generated"):
    GeneratedPairs(str(tmp_path / "images"))


def test_the_train_split_takes_the_first_n_real_examples_and_the_extra_pairs(tmp_path, real):
  from tests import helpers  # pylint: disable=g-import-not-at-top
  _write(tmp_path / "pairs", real, [0, 1, 2])
  config = helpers.tiny_config(steps=1)
  config.data.extra_train_dir = str(tmp_path / "pairs")
  train, _ = from_config.make_sources(config)
  assert len(train) == 100_000 + 3 and repr(train).endswith("count=3)")
  config.data.num_train_examples = 10  # a low-data run: 10 real images, then the pairs
  train, _ = from_config.make_sources(config)
  assert len(train) == 13 and "[:10] + GeneratedPairs(" in repr(train)
  np.testing.assert_array_equal(train[10]["label"], real[0]["label"])
  config.data.extra_train_fraction = 0.5  # half of the examples from the pairs
  train, _ = from_config.make_sources(config)
  assert repr(train).startswith("Mixture(") and len(train) == 20
  config.data.num_train_examples = -1
  with pytest.raises(JaxsegError, match=r"--config.data.num_train_examples=-1 must be at least"):
    from_config.make_sources(config)
  # Training on them is experiments.gan_augment's end-to-end test (tests/test_gan_augment.py).
