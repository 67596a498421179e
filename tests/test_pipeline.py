"""Input pipeline: seeded shuffling, exact iterator restore, eval padding, label validation."""

import time

import numpy as np
import pytest

from jaxseg.data import get_dataset, pipeline
from jaxseg.errors import JaxsegError


def _loader(source, seed=0, batch=4):
  return pipeline.train_loader(source, batch_size=batch, seed=seed,
                               operations=[pipeline.ValidateLabels(source.num_classes)])


def test_loader_is_seeded_and_restores_position_exactly():
  source = get_dataset("synthetic", "train", image_size=16, num_examples=40)
  a = iter(_loader(source))
  first = [next(a)["image"] for _ in range(3)]
  state = a.get_state()
  expected = [next(a)["image"] for _ in range(4)]  # crosses the epoch boundary (40 / 4 = 10)
  b = iter(_loader(source))
  b.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(b)["image"], want)
  again = iter(_loader(source))
  np.testing.assert_array_equal(next(again)["image"], first[0])
  other = iter(_loader(source, seed=1))
  assert not np.array_equal(next(other)["image"], first[0])


def test_eval_batches_split_disjointly_over_processes():
  source = get_dataset("synthetic", "val", image_size=16, num_examples=5)
  seen = []
  for p in range(2):
    batches = list(pipeline.eval_batches(source, 2, process_index=p, process_count=2))
    assert len(batches) == 2  # same count on every process
    for b in batches:
      for image, real in zip(b["image"], b["mask"]):
        if real:
          seen.append(next(i for i in range(5) if np.array_equal(source[i]["image"], image)))
  assert sorted(seen) == [0, 1, 2, 3, 4]


def test_eval_batches_pad_and_mask():
  source = get_dataset("synthetic", "val", image_size=16, num_examples=5)
  batches = list(pipeline.eval_batches(source, 4))
  assert [b["mask"].tolist() for b in batches] == [[True] * 4, [True, False, False, False]]
  assert [b["index"].tolist() for b in batches] == [[0, 1, 2, 3], [4, -1, -1, -1]]
  np.testing.assert_array_equal(batches[1]["image"][0], source[4]["image"])
  assert batches[1]["image"].shape == (4, 16, 16, 3) and batches[1]["label"].dtype == np.uint8


class _BadLabels:
  """A source whose third example has a label value past the class range."""
  num_classes, ignore_index = 3, 255

  def __len__(self):
    return 8

  def __getitem__(self, i):
    label = np.full((4, 4), 2 if i != 2 else 9, np.uint8)
    return {"image": np.zeros((4, 4, 3), np.uint8), "label": label}

  def __repr__(self):
    return "_BadLabels()"


def test_bad_label_stops_the_loader_with_a_clear_error():
  loader = pipeline.train_loader(_BadLabels(), batch_size=8, seed=0,
                                 operations=[pipeline.ValidateLabels(3, 255, "_BadLabels()")])
  with pytest.raises(JaxsegError, match=r"_BadLabels\(\): label values \[9\] are outside 0..2"):
    next(iter(loader))
  with pytest.raises(JaxsegError, match="label values"):
    list(pipeline.eval_batches(_BadLabels(), 4, validate=pipeline.ValidateLabels(3)))


def test_unknown_dataset_lists_choices():
  with pytest.raises(JaxsegError, match="valid choices: ade20k, camvid, cityscapes, coco, folder, synthetic, voc"):
    get_dataset("cityscape", "train", image_size=16)


def test_prefetch_checkpoints_the_consumed_position_not_the_read_ahead():
  source = get_dataset("synthetic", "train", image_size=16, num_examples=40)
  reference = iter(_loader(source))
  expected = [next(reference)["image"] for _ in range(6)]
  ahead = pipeline.Prefetch(iter(_loader(source)), put=lambda b: b, size=3)
  for want in expected[:2]:
    np.testing.assert_array_equal(next(ahead)["image"], want)
  state = ahead.get_state()  # the thread has read further; the state must not say so
  ahead.close()
  resumed = pipeline.Prefetch(iter(_loader(source)), put=lambda b: b)
  resumed.set_state(state)
  for want in expected[2:]:
    np.testing.assert_array_equal(next(resumed)["image"], want)
  resumed.close()


def test_prefetch_raises_the_reader_error_in_the_consumer():
  ahead = pipeline.Prefetch(iter(pipeline.train_loader(
      _BadLabels(), batch_size=8, seed=0, operations=[pipeline.ValidateLabels(3, 255)])),
                            put=lambda b: b)
  with pytest.raises(JaxsegError, match="label values"):
    next(ahead)
  with pytest.raises(JaxsegError, match="label values"):  # again, rather than hang
    next(ahead)
  ahead.close()
  with pytest.raises(JaxsegError, match=r"--config.data.prefetch=0 must be at least 1"):
    pipeline.Prefetch(iter([]), put=lambda b: b, size=0)


def test_prefetch_close_unblocks_a_reader_waiting_on_a_full_queue():
  source = get_dataset("synthetic", "train", image_size=16, num_examples=40)
  ahead = pipeline.Prefetch(iter(_loader(source)), put=lambda b: b, size=1)
  next(ahead)
  time.sleep(0.5)  # the thread has filled the queue and waits to put the next batch
  ahead.close()
  assert not ahead._thread.is_alive()  # pylint: disable=protected-access
  with pytest.raises(RuntimeError, match="closed"):
    next(ahead)
