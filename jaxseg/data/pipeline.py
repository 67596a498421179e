"""Input pipelines: a grain loader for training (resumable), plain batching for evaluation."""

from __future__ import annotations

from typing import Iterator, Sequence

import grain.python as grain
import numpy as np

from jaxseg.errors import JaxsegError


class ValidateLabels(grain.MapTransform):
  """Rejects label values outside [0, num_classes) other than `ignore_index`.

  This is the data boundary: inside a jitted step such a label would be silently wrong
  (`one_hot` gives all zeros, gathers clamp), so it must never get that far.
  """

  def __init__(self, num_classes: int, ignore_index: int = 255, source: str = "dataset"):
    self.num_classes, self.ignore_index, self.source = num_classes, ignore_index, source

  def map(self, example):
    label = example["label"]
    bad = (label >= self.num_classes) & (label != self.ignore_index)
    if bad.any():
      values = sorted(set(np.unique(label[bad]).tolist()))
      where = example.get("name", self.source)
      raise JaxsegError(
          f"{where}: label values {values[:8]} are outside 0..{self.num_classes - 1} and not "
          f"the ignore index {self.ignore_index}; fix the labels or the dataset's class count")
    return example


def train_loader(source, *, batch_size: int, seed: int, operations: Sequence = (),
                 worker_count: int = 0, num_epochs: int | None = None) -> grain.DataLoader:
  """Shuffled (per-epoch, seeded), process-sharded, batched loader with checkpointable state.

  `batch_size` is this process's share of the global batch. Iterating it gives a
  `grain.PyGrainDatasetIterator` whose position is saved in the checkpoint.
  """
  sampler = grain.IndexSampler(
      num_records=len(source), shuffle=True, seed=seed, num_epochs=num_epochs,
      shard_options=grain.ShardByJaxProcess(drop_remainder=True))
  return grain.DataLoader(
      data_source=source, sampler=sampler,
      operations=[*operations, grain.Batch(batch_size, drop_remainder=True)],
      worker_count=worker_count)


def eval_batches(source, batch_size: int, num_examples: int | None = None,
                 validate: ValidateLabels | None = None, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Every example once over all processes, in order; padding is marked by `mask` = False.

  Process p reads examples p, p + P, p + 2P, ... in `batch_size` (its share of the global
  batch) chunks; every process yields the same number of batches, as a collective step needs.
  """
  n = len(source) if num_examples is None else min(num_examples, len(source))
  if n == 0:
    raise JaxsegError(f"{source!r} has no examples to evaluate")
  mine = list(range(process_index, n, process_count))
  per_process = -(-n // process_count)
  for start in range(0, per_process, batch_size):
    examples = [source[i] for i in mine[start:start + batch_size]]
    if validate is not None:
      examples = [validate.map(e) for e in examples]
    mask = np.zeros(batch_size, bool)
    mask[:len(examples)] = True
    # Padding repeats a real example (example 0 where this process ran out first); masked out.
    examples += [examples[-1] if examples else source[0]] * (batch_size - len(examples))
    yield {"image": np.stack([e["image"] for e in examples]),
           "label": np.stack([e["label"] for e in examples]), "mask": mask}
