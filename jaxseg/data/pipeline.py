"""Input pipelines: a grain loader for training (resumable), plain batching for evaluation,
dropping of bad examples, and host-to-device prefetch."""

from __future__ import annotations

import concurrent.futures
import json
import os
import queue
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import grain.python as grain
import jax
import numpy as np
import tqdm
from absl import flags, logging

from jaxseg.data.files import BAD_KEY, check_label_range
from jaxseg.errors import JaxsegError


class ValidateLabels(grain.MapTransform):
  """Rejects label values outside [0, num_classes) other than `ignore_index`.

  This is the data boundary: inside a jitted step such a label would be silently wrong
  (`one_hot` gives all zeros, gathers clamp), so it must never get that far.
  """

  def __init__(self, num_classes: int, ignore_index: int = 255, source: str = "dataset"):
    self.num_classes, self.ignore_index, self.source = num_classes, ignore_index, source

  def map(self, example):
    if BAD_KEY not in example:
      check_label_range(example["label"], self.num_classes, self.ignore_index,
                        example.get("name", self.source))
    return example


class DropBadExamples(grain.FilterTransform):
  """Drops the examples a source skipped ({BAD_KEY: message}), logging each one.

  With `log_path`, each is also appended as a JSON line: worker processes cannot report back
  to the training loop, but they can all append to one file (O_APPEND writes of one short line
  do not interleave), which the run summary counts and the user can read.
  """

  def __init__(self, log_path: str | None = None):
    self.log_path = log_path

  def filter(self, example) -> bool:
    if BAD_KEY not in example:
      return True
    logging.warning("skipped bad example: %s", example[BAD_KEY])
    if self.log_path:
      with open(self.log_path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"error": example[BAD_KEY]}) + "\n")
    return False


def check_examples(source, validate: ValidateLabels, num_examples: int | None = None,
                   process_index: int = 0, process_count: int = 1,
                   desc: str | None = None) -> int:
  """Reads this process's share of the first `num_examples` of `source` and checks their
  labels, so that a bad file of a split read only after training (the val split) stops the
  run before it trains, in one line naming the file. Returns how many examples the source
  skips as bad (`skip_bad_examples`). Decoding runs on a thread per core."""
  n = len(source) if num_examples is None else min(num_examples, len(source))

  def check(i):
    example = source[i]
    if BAD_KEY in example:
      return 1
    validate.map(example)
    return 0

  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    results = pool.map(check, range(process_index, n, process_count))
    return sum(tqdm.tqdm(results, total=len(range(process_index, n, process_count)),
                         desc=desc, unit="example", dynamic_ncols=True, mininterval=1.0,
                         disable=desc is None or process_index != 0, leave=False))


def count_logged(log_path: str) -> int:
  """Distinct bad examples in a DropBadExamples log (a resumed run may meet one again)."""
  if not os.path.exists(log_path):
    return 0
  with open(log_path, encoding="utf-8") as f:
    return len({line.strip() for line in f if line.strip()})


def _exit_when_orphaned(parent: int) -> None:
  """Ends this process soon after `parent` is gone (it is then re-parented)."""

  def watch():
    while os.getppid() == parent:
      time.sleep(0.5)
    os._exit(0)  # pylint: disable=protected-access

  threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


class ExitWithParent(grain.MapTransform):
  """Identity on examples; unpickled inside a grain worker, it ends the worker when the
  training process dies.

  Grain's worker processes block forever on a full queue once the process that reads them is
  gone (killed by the scheduler, an OOM, a SIGKILL): they would pile up, holding memory and
  the terminal's pipes. Grain runs no user code at worker start, but it unpickles the
  operations there, so `__setstate__` is the hook. Workers also ignore SIGTERM: a scheduler
  sends it to the whole process group before preemption, and the training process keeps
  reading batches up to the checkpoint it then saves (jaxseg.train.distributed.Preemption).
  """

  def __init__(self):
    self.parent = os.getpid()

  def __setstate__(self, state):
    self.__dict__.update(state)
    if os.getpid() != self.parent:
      _exit_when_orphaned(self.parent)
      try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
      except ValueError:  # not the worker's main thread: it keeps the default
        pass

  def map(self, example):
    return example


class GlobalBatchSampler:
  """Grain sampler of this process's rows of the global batches one process would read.

  Global batch s is positions s*G .. s*G+G-1 of one seeded record stream (a fresh shuffle
  every epoch, grain.IndexSampler's), and process p reads its rows p*L .. p*L+L-1 (L = G/P):
  the slice of the batch its devices hold in the mesh (`sharding.make_mesh` orders devices by
  process). Grain batches inside each of W workers and takes their batches in turn, so local
  index k of worker w = k % W is placed where that worker's j-th batch is global batch
  j*W + w. The batches, and each record's augmentation (seeded by its stream position), are
  then the same for any number of processes and workers: a run's metrics do not depend on
  how it was laid out, and its data position is a function of the global batches consumed.
  """

  def __init__(self, num_records: int, global_batch_size: int, *, seed: int,
               process_index: int = 0, process_count: int = 1, worker_count: int = 0,
               num_epochs: int | None = None):
    if global_batch_size % process_count:
      raise JaxsegError(f"global batch {global_batch_size} does not split over "
                        f"{process_count} processes")
    self.num_records, self.global_batch_size, self.seed = num_records, global_batch_size, seed
    self.process_index, self.process_count = process_index, process_count
    self.worker_count, self.num_epochs = worker_count, num_epochs
    self.local_batch_size = global_batch_size // process_count
    self._stream = grain.IndexSampler(num_records=num_records, shuffle=True, seed=seed,
                                      num_epochs=None, shard_options=grain.NoSharding())
    self._len = sys.maxsize if num_epochs is None else self._finite_length(num_epochs)

  def _finite_length(self, num_epochs: int) -> int:
    """Local indices whose positions lie within `num_epochs` epochs (a prefix of them)."""
    total, g, b = num_epochs * self.num_records, self.global_batch_size, self.local_batch_size
    if self.worker_count > 1:  # whole rounds of worker batches
      return total // g // self.worker_count * self.worker_count * b
    rest = total - total // g * g
    return total // g * b + min(max(rest - self.process_index * b, 0), b)

  def with_layout(self, process_index: int, process_count: int,
                  worker_count: int) -> "GlobalBatchSampler":
    """This sampler as process `process_index` of `process_count` with `worker_count` grain
    workers would have it (the same global batches)."""
    return GlobalBatchSampler(self.num_records, self.global_batch_size, seed=self.seed,
                              process_index=process_index, process_count=process_count,
                              worker_count=worker_count, num_epochs=self.num_epochs)

  def position(self, index: int) -> int:
    """The stream position of local index `index`."""
    workers = max(self.worker_count, 1)
    worker, within = index % workers, index // workers
    batch, row = divmod(within, self.local_batch_size)
    global_batch = batch * workers + worker
    return (global_batch * self.global_batch_size + self.process_index * self.local_batch_size
            + row)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int):
    if not 0 <= index < self._len:
      raise IndexError(f"sampler index {index} out of range [0, {self._len})")
    record = self._stream[self.position(index)]
    return grain.RecordMetadata(index=index, record_key=record.record_key, rng=record.rng)

  def __repr__(self) -> str:
    # Grain checks a resumed iterator against this; the process and worker layout are left
    # out because a position carries over to another one (`iterator_state`).
    return (f"GlobalBatchSampler(num_records={self.num_records}, global_batch_size="
            f"{self.global_batch_size}, seed={self.seed}, num_epochs={self.num_epochs})")

  def iterator_state(self, global_batches: int, template: dict) -> dict:
    """The grain iterator state after `global_batches` batches, every record of them read
    (none dropped as bad). `template` is a fresh iterator's state (version, source...).

    Grain records, per worker, the last local index it handed out (worker w reads local
    indices w, w + W, ...; without workers, one reader) and which worker handed out the last
    batch; `DataLoader` iterators restore from exactly this.
    """
    workers, b = self.worker_count, self.local_batch_size
    if workers == 0:
      last_seen, last_worker = {"0": global_batches * b - 1}, -1
    else:
      last_seen = {}
      for w in range(workers):
        batches = max(0, -(-(global_batches - w) // workers))
        last_seen[str(w)] = w + workers * (batches * b - 1)
      last_worker = global_batches % workers - 1
    return {**template, "last_seen_indices": last_seen, "last_worker_index": last_worker,
            "worker_count": workers, "sampler": repr(self)}


class TrainLoader(grain.DataLoader):
  """grain.DataLoader that keeps its `GlobalBatchSampler` at hand (a resume on another process
  layout rebuilds the data position from it)."""

  def __init__(self, *, sampler: GlobalBatchSampler, **kwargs):
    self.global_sampler = sampler
    super().__init__(sampler=sampler, shard_options=grain.NoSharding(), **kwargs)


def train_loader(source, *, batch_size: int, seed: int, operations: Sequence = (),
                 worker_count: int = 0, num_epochs: int | None = None,
                 read_threads: int = 8, process_index: int | None = None,
                 process_count: int | None = None) -> TrainLoader:
  """Shuffled (per-epoch, seeded), batched loader of this process's share, checkpointable.

  `batch_size` is this process's share of the global batch (process_count x batch_size);
  the global batches are the same for any number of processes and workers
  (`GlobalBatchSampler`). Iterating gives a grain iterator whose position is saved in the
  checkpoint. The process layout defaults to JAX's.
  """
  if worker_count and not flags.FLAGS.is_parsed():
    # Grain's workers read its absl flags; a library caller (a notebook, a test) has parsed
    # none, which would kill every worker.
    flags.FLAGS.mark_as_parsed()
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  sampler = GlobalBatchSampler(len(source), batch_size * process_count, seed=seed,
                               process_index=process_index, process_count=process_count,
                               worker_count=worker_count, num_epochs=num_epochs)
  return TrainLoader(
      data_source=source, sampler=sampler,
      operations=[*([ExitWithParent()] if worker_count else []), *operations,
                  grain.Batch(batch_size, drop_remainder=True)],
      worker_count=worker_count,
      # grain reads 500 examples ahead by default: 4 GB of decoded Cityscapes frames per
      # worker, and CPU spent far ahead of the step. Two batches ahead keep the threads busy.
      read_options=grain.ReadOptions(num_threads=read_threads,
                                     prefetch_buffer_size=max(2 * batch_size, 16)))


def eval_batches(source, batch_size: int, num_examples: int | None = None,
                 validate: ValidateLabels | None = None, process_index: int = 0,
                 process_count: int = 1, operations: Sequence[grain.MapTransform] = (),
                 skip_log: str | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Every example once over all processes, in order; padding is marked by `mask` = False.

  Process p reads examples p, p + P, p + 2P, ... in `batch_size` (its share of the global
  batch) chunks; every process yields the same number of batches, as a collective step needs.
  `operations` (e.g. transforms.PadTo) map each example after validation. A skipped bad
  example ({BAD_KEY: ...}) is logged (to `skip_log` too) and left out: its slot is padding,
  so the others still count once. `index` gives each row's example index (-1: padding).
  """
  n = len(source) if num_examples is None else min(num_examples, len(source))
  if n == 0:
    raise JaxsegError(f"{source!r} has no examples to evaluate")
  mine = list(range(process_index, n, process_count))
  per_process = -(-n // process_count)
  drop = DropBadExamples(skip_log)

  def read(i):
    example = source[i]
    if not drop.filter(example):
      return None
    if validate is not None:
      example = validate.map(example)
    for op in operations:
      example = op.map(example)
    return example

  fallback = None
  for start in range(0, per_process, batch_size):
    chunk = [(i, read(i)) for i in mine[start:start + batch_size]]
    indices = [i for i, e in chunk if e is not None]
    examples = [e for _, e in chunk if e is not None]
    mask = np.zeros(batch_size, bool)
    mask[:len(examples)] = True
    # Padding repeats a real example (the first readable one where this process ran out or
    # skipped them all); masked out.
    if examples:
      fallback = examples[-1]
    elif fallback is None:
      fallback = next((e for e in map(read, range(n)) if e is not None), None)
      if fallback is None:
        raise JaxsegError(f"{source!r}: every example to evaluate was skipped as bad")
    index = np.full(batch_size, -1, np.int64)
    index[:len(indices)] = indices
    examples += [fallback] * (batch_size - len(examples))
    shapes = sorted({np.shape(e["image"]) for e in examples})
    if len(shapes) > 1:
      raise JaxsegError(f"{source!r}: val images differ in size ({shapes[0]}, {shapes[-1]}); "
                        "set --config.data.eval_size=H,W to a canvas that holds the largest "
                        "(padding is ignored)")
    yield {"image": np.stack([e["image"] for e in examples]),
           "label": np.stack([e["label"] for e in examples]), "mask": mask, "index": index}


class Prefetch:
  """Reads and transfers the next `size` batches in a background thread while the device
  computes, and checkpoints like the iterator it wraps: `get_state` is the position after the
  last batch handed out, not after the ones read ahead, so a resume replays nothing and skips
  nothing.
  """

  def __init__(self, iterator, put: Callable[[Any], Any], size: int = 2):
    if size < 1:
      raise JaxsegError(f"--config.data.prefetch={size} must be at least 1 (batches read "
                        "ahead; 1 still overlaps one read with the step)")
    self._iterator, self._put, self._size = iterator, put, size
    self._queue: queue.Queue | None = None
    self._state = None
    self._thread = None
    self._stop = threading.Event()
    self._error: BaseException | None = None  # once raised, raised again by every next()

  def set_state(self, state) -> None:
    if self._thread is not None:
      raise RuntimeError("Prefetch.set_state after iteration started")
    self._iterator.set_state(state)

  def get_state(self):
    return self._iterator.get_state() if self._thread is None else self._state

  def start_prefetch(self) -> None:
    """Grain's checkpoint handler calls this after a restore (its own iterators prefetch)."""
    if hasattr(self._iterator, "start_prefetch"):
      self._iterator.start_prefetch()

  def _offer(self, item) -> None:
    """Queues `item` unless asked to stop first (the consumer may never read again)."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return
      except queue.Full:
        continue

  def _run(self):
    try:
      while not self._stop.is_set():
        batch = next(self._iterator)
        self._offer((self._put(batch), self._iterator.get_state(), None))
    except BaseException as e:  # pylint: disable=broad-except  # re-raised in the consumer
      self._offer((None, None, e))

  def __iter__(self):
    return self

  def __next__(self):
    if self._error is not None:
      raise self._error
    if self._stop.is_set():
      raise RuntimeError("Prefetch is closed")
    if self._thread is None:
      self._queue = queue.Queue(self._size)
      self._thread = threading.Thread(target=self._run, daemon=True, name="prefetch")
      self._thread.start()
    batch, state, error = self._queue.get()
    if error is not None:
      self._error = error  # the thread has ended: say so again rather than block
      raise error
    self._state = state
    return batch

  def close(self) -> None:
    """Stops reading ahead and the loader's worker processes."""
    self._stop.set()
    if self._thread is not None:
      while self._thread.is_alive():  # unblock a reader waiting on a full queue
        try:
          self._queue.get_nowait()
        except queue.Empty:
          self._thread.join(timeout=0.1)
    close_iterator(self._iterator)


def close_iterator(iterator) -> None:
  """Stops a grain loader iterator's worker processes now rather than at exit."""
  # grain's DataLoaderIterator has no public close; its pipeline iterator stops the workers.
  inner = getattr(iterator, "_iterator", None)
  if hasattr(inner, "close"):
    inner.close()
