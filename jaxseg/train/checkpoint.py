"""Orbax checkpoints of the train state, the data iterator position and the model identity.

Saves are asynchronous: the arrays are copied to host memory before `save` returns (so the
state can be donated to the next step right away) and written in the background. Orbax writes
each step into a temporary directory and renames it when complete, so a process killed in the
middle of a save leaves a temporary directory that `latest_step` never returns: the previous
complete step restores.

Faults are one line each. A checkpoint that cannot be read back (a file missing, truncated or
overwritten) is damaged: `resume` warns and falls back to the newest intact one, and refuses in
one line when none is. One whose identity does not match this run is refused as before (an
older one would not match either). A save that cannot be written (disk full, read-only, quota)
raises from the next `save` or `wait`, naming the last good checkpoint, and leaves no
temporary directory behind.
"""

from __future__ import annotations

import errno
import functools
import glob
import hashlib
import json
import logging as py_logging
import math
import os
import re
import shutil
import sys
import warnings
from typing import Any, Callable

import grain.python as grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from jaxseg.errors import JaxsegError, first_line


def workdir_path(workdir: str) -> str:
  """The absolute path of a run directory. A URL (gs://...) is refused in one line: the run's
  outputs are written with Python's file API, so a bucket is used through a mount."""
  if re.match(r"^[a-z][a-z0-9+.-]*://", str(workdir)):
    raise JaxsegError(f"--workdir={workdir}: URLs are not supported; mount the bucket on every "
                      "host (e.g. gcsfuse --implicit-dirs BUCKET ~/gcs) and pass a path under "
                      "the mount")
  return os.path.abspath(workdir)


def param_shapes(params) -> dict[str, list[int]]:
  """{'backbone/stem/conv/kernel': [7, 7, 3, 64], ...} for identity checks and error messages."""
  flat = traverse_util.flatten_dict(jax.tree.map(lambda x: list(x.shape), params,
                                                 is_leaf=lambda x: hasattr(x, "shape")), sep="/")
  return dict(sorted(flat.items()))


def _short(value, limit: int = 120) -> str:
  text = str(value)
  return text if len(text) <= limit else text[:limit] + "..."


def tree_signature(tree) -> str:
  """Optimizer-state identity: its state types (readable) and a digest of structure + shapes."""
  shapes = jax.tree.map(lambda x: tuple(getattr(x, "shape", ())), tree)
  digest = hashlib.sha1((str(jax.tree.structure(tree)) + str(jax.tree.leaves(shapes))).encode())
  nodes = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "_fields"))
  names = [type(n).__name__ for n in nodes if hasattr(n, "_fields")]
  names = [n for n in dict.fromkeys(names) if n != "EmptyState"]
  return f"{'+'.join(names) or 'stateless'} [{digest.hexdigest()[:10]}]"


class _IteratorSnapshot:
  """An iterator state frozen at save time (grain's handler may run after `save` returns)."""

  def __init__(self, state):
    self._state = state

  def get_state(self):
    return self._state


class DamagedCheckpoint(JaxsegError):
  """A checkpoint that cannot be read back: a file missing, truncated or overwritten."""

  def __init__(self, message: str, step: int | None = None, reason: str | None = None):
    super().__init__(message)  # (the message alone as args: it pickles)
    self.step, self.reason = step, reason

  @classmethod
  def of(cls, directory: str, step: int, part: str, error: BaseException) -> DamagedCheckpoint:
    reason = f"{part}: {_short(first_line(error), 160)}"
    return cls(f"checkpoint {step} in {directory} is damaged ({reason})", step, reason)


# What a failed write says, by errno; others are named by their strerror.
_WRITE_FAULTS = {
    errno.ENOSPC: ("no space left on {}", "free space and run again"),
    errno.EDQUOT: ("disk quota exceeded on {}", "free space and run again"),
    errno.EROFS: ("read-only file system at {}", "make it writable and run again"),
    errno.EACCES: ("permission denied on {}", "make it writable and run again"),
    errno.EPERM: ("permission denied on {}", "make it writable and run again"),
}
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax 0.11/0.12: `30.orbax-checkpoint-tmp[-<time>]`


def _causes(error: BaseException):
  """`error` and the exceptions it was raised from or while handling."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def _os_errno(error: BaseException) -> int | None:
  """The errno behind a failed write: an OSError's own, or the one tensorstore writes into its
  message (`... No space left on device [os_error_code='28']`); None for other failures."""
  for e in _causes(error):
    if isinstance(e, OSError) and e.errno:
      return e.errno
    found = re.search(r"os_error_code='?(\d+)|\[Errno (\d+)\]", str(e))
    if found:
      return int(found.group(1) or found.group(2))
  return None


def _through_orbax(error: BaseException) -> bool:
  """Whether `error` was raised in Orbax's code, or by a tensorstore read or write of it
  (those carry no Python frames, only their spec)."""
  tb = error.__traceback__
  while tb is not None:
    if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return any(mark in str(error) for mark in ("tensorstore_spec", "OCDBT database"))


class _OrbaxNoise(py_logging.Filter):
  """Drops the tracebacks Orbax logs from its threads for a failure this module reports in
  one line: a failed write is logged, traceback and all, by every thread that waited on it,
  and a failed restore leaves gathered futures whose errors asyncio logs when collected."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    if error is None:
      return True
    if record.name == "absl":
      return not (f"{os.sep}orbax{os.sep}" in record.pathname and _os_errno(error) is not None)
    return not ("never retrieved" in str(record.msg) and _through_orbax(error))


def _orbax_leftover(unraisable) -> bool:
  """After a failed restore, tensorstore reads still in flight complete into Orbax's closed
  event loop ('Event loop is closed'), and its abandoned coroutines raise as they are
  collected: Python prints each as an unraisable traceback."""
  error, tb = unraisable.exc_value, unraisable.exc_traceback
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  late = (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
          and tb is not None
          and tb.tb_frame.f_code.co_filename.endswith(os.path.join("asyncio", "base_events.py")))
  return late or (error is not None and _through_orbax(error))


_NOISE = _OrbaxNoise()


def _quiet_orbax_noise() -> None:
  """Installs the filters above once per process (`addFilter` ignores a repeat)."""
  py_logging.getLogger("absl").addFilter(_NOISE)
  py_logging.getLogger("asyncio").addFilter(_NOISE)
  # A failed restore also abandons Orbax's array-metadata read (a warning when collected).
  warnings.filterwarnings("ignore", r"coroutine 'Store\._get_array_metadatas' was never awaited",
                          RuntimeWarning)
  previous = sys.unraisablehook
  if getattr(previous, "_jaxseg_quiet", False):
    return

  def hook(unraisable):
    if not _orbax_leftover(unraisable):
      previous(unraisable)

  hook._jaxseg_quiet = True
  sys.unraisablehook = hook


class Checkpointer:
  """Saves/restores {state, data iterator, identity} under `directory`, keeping the last `keep`."""

  def __init__(self, directory: str, identity: dict[str, Any], *, keep: int = 3,
               async_save: bool = True, sampler=None, best: str = ""):
    """`sampler` (the training loader's `pipeline.GlobalBatchSampler`) lets a run resume on
    another number of processes: each process saves its own iterator state, and the one
    for a new layout is rebuilt from the global batches consumed.

    `best` (a key of the metrics given to `save`, e.g. "eval/miou", higher is better) keeps
    the checkpoint with its highest value beside the last `keep`: Orbax writes the metrics
    into the step's directory (so the choice survives a restart and a kill) and its
    preservation policy keeps what either rule wants. Ties go to the later step."""
    self.directory = os.path.abspath(directory)
    self.identity = identity
    self.sampler = sampler
    self.best = best
    self._unconfirmed: int | None = None  # the step of the save in flight
    self._failed: set[int] = set()  # steps whose save failed: temporaries to remove on close
    _quiet_orbax_noise()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            create=True, enable_async_checkpointing=async_save, save_root_metadata=False,
            **self._keeping(keep, best)),
        item_names=("state", "data", "identity", "progress"),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.PyGrainCheckpointHandler(),
                       "identity": ocp.JsonCheckpointHandler(),
                       "progress": ocp.JsonCheckpointHandler()})

  @staticmethod
  def _keeping(keep: int, best: str) -> dict[str, Any]:
    if not best:
      return {"max_to_keep": keep}
    score = functools.partial(_score, best)
    policies = ocp.checkpoint_managers
    return {"best_fn": score, "best_mode": "max",  # best_fn: Orbax then records metrics
            "preservation_policy": policies.AnyPreservationPolicy([
                policies.LatestN(n=keep),
                policies.BestN(get_metric_fn=score, n=1,
                               keep_checkpoints_without_metrics=False)])}

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the best `best` metric (None without `best` or a scored checkpoint)."""
    if not self.best:
      return None
    scores = {s: self.metrics(s) for s in self.manager.all_steps()}  # one read per step
    # Orbax's own ranking (stable: of equal scores the later step wins, as BestN keeps it).
    return max((s for s, m in scores.items() if m is not None),
               key=lambda s: (_score(self.best, scores[s]), s), default=None)

  def metrics(self, step: int) -> dict[str, Any] | None:
    """The metrics saved with `step` (None: saved without, or without `best`)."""
    return self.manager.metrics(step) if self.best else None

  def last_good_step(self) -> int | None:
    """The newest checkpoint known to be complete (a save still in flight is not)."""
    return max((s for s in self.manager.all_steps() if s != self._unconfirmed), default=None)

  def saved_identity(self, step: int) -> dict[str, Any]:
    """The identity saved with `step`: model, classes, parameter shapes, preprocessing...
    Unreadable, it makes the checkpoint damaged (not another model's)."""
    try:
      return dict(self.manager.restore(step, args=ocp.args.Composite(
          identity=ocp.args.JsonRestore()))["identity"])
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpoint.of(self.directory, step, "identity", e) from e

  def check_identity(self, step: int, saved: dict[str, Any] | None = None) -> None:
    """Raises a one-line error if the checkpoint at `step` belongs to another model."""
    saved = self.saved_identity(step) if saved is None else saved
    mine = self.identity
    described = lambda d: (f"{d.get('model')}/{d.get('backbone')} with "
                           f"{d.get('num_classes')} classes")
    if any(saved.get(k) != mine.get(k) for k in ("model", "backbone", "num_classes")):
      raise JaxsegError(
          f"{self.directory} holds a checkpoint of {described(saved)} (step {step}), but this "
          f"run builds {described(mine)}; use another --workdir or move the old one away "
          f"(it was left untouched)")
    old, new = saved.get("params", {}), mine.get("params", {})
    if old != new:
      path = next((p for p in sorted(set(old) | set(new)) if old.get(p) != new.get(p)), "?")
      raise JaxsegError(
          f"{self.directory} (step {step}): parameter {path} has shape {old.get(path)} in the "
          f"checkpoint but {new.get(path)} in this model; use another --workdir or the "
          f"checkpoint's config (it was left untouched)")
    for key, what in (("opt_state", "optimizer state (optim.* settings)"),
                      ("train_data", "training data (data.* settings)"),
                      ("global_batch_size", "global batch size (train.batch_size)"),
                      ("preprocessing", "input preprocessing (model.pretrained)")):
      if key in mine and saved.get(key) != mine[key]:
        raise JaxsegError(
            f"{self.directory} (step {step}) was written with another {what}: "
            f"{_short(saved.get(key))} there, {_short(mine[key])} now; resume with the same "
            f"settings, or use another --workdir (it was left untouched)")

  def _restore_item(self, step: int, name: str, args):
    """One item of `step`. The identity check has passed, so a failure here is damage."""
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**{name: args}))[name]
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpoint.of(self.directory, step, name, e) from e

  def restore(self, step: int, abstract_state, data_iterator=None):
    """(state, progress) at `step`; shardings come from `abstract_state`, and the data
    iterator is moved to the saved position. `progress` is the dict given to `save`.

    Raises `DamagedCheckpoint` for a checkpoint that cannot be read back, and another
    one-line `JaxsegError` for one of another run. The iterator moves only once the state
    and progress have been read, and is put back if its own position cannot be."""
    self.check_identity(step)
    carried = None
    if data_iterator is not None:
      try:
        carried = self._carried_position(step, data_iterator)
      except JaxsegError:
        raise  # another layout of processes: refused, whatever the older checkpoints hold
      except Exception as e:  # pylint: disable=broad-except
        raise DamagedCheckpoint.of(self.directory, step, "data", e) from e
    state = self._restore_item(step, "state", ocp.args.StandardRestore(abstract_state))
    progress = self._restore_item(step, "progress", ocp.args.JsonRestore())
    if not isinstance(progress or {}, dict):
      raise DamagedCheckpoint.of(self.directory, step, "progress",
                                 TypeError(f"a {type(progress).__name__}, not a dict"))
    if data_iterator is not None:
      if carried is not None:
        data_iterator.set_state(carried)
      else:
        before = data_iterator.get_state()
        try:
          self._restore_item(step, "data", grain.PyGrainCheckpointRestore(data_iterator))
        except DamagedCheckpoint:
          data_iterator.set_state(before)
          raise
    return state, dict(progress or {})

  def _carried_position(self, step: int, data_iterator) -> bytes | None:
    """None when the checkpoint holds this process's iterator state for this loader; else
    the state that continues the saved run on this layout of processes and grain workers,
    or a one-line error saying why it cannot."""
    folder = os.path.join(self.directory, str(step), "data")
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    counts = {int(m.group(1)) for m in map(re.compile(r"process_\d+-of-(\d+)\.json$").match,
                                           names) if m}
    if not counts:
      return None
    old, count = max(counts), jax.process_count()

    def saved(index):
      with open(os.path.join(folder, f"process_{index}-of-{old}.json")) as f:
        return json.load(f)

    template = json.loads(data_iterator.get_state())
    workers = template["worker_count"]
    if old == count and saved(jax.process_index()).get("worker_count") == workers:
      return None
    old_workers = saved(0).get("worker_count")
    where = (f"{self.directory} (step {step}) was written by {old} process(es) with "
             f"--config.data.worker_count={old_workers}, this run has {count} and {workers}")
    if self.sampler is None:
      raise JaxsegError(f"{where}; resume with the same")
    for index in range(old):
      theirs = saved(index)
      expected = self.sampler.with_layout(index, old, theirs.get("worker_count", 0)
                                          ).iterator_state(step, template)
      if any(theirs.get(k) != expected[k] for k in ("sampler", "last_seen_indices",
                                                     "last_worker_index")):
        # Dropped bad examples (or other data) moved process `index` off the global batches:
        # its position means nothing to another layout.
        raise JaxsegError(f"{where}, and its data position (process {index}) is not the one "
                          f"{step} global batches give (bad examples skipped?); resume with "
                          f"the same")
    logging.info("%s: the data position carries over (%d global batches)", where, step)
    return json.dumps(self.sampler.iterator_state(step, template)).encode()

  def restore_state(self, step: int, abstract_state):
    """The train state alone at `step` (no data iterator): for inference from a run."""
    self.check_identity(step)
    return self._restore_item(step, "state", ocp.args.StandardRestore(abstract_state))

  def save(self, step: int, state, data_iterator=None, *, progress: dict | None = None,
           metrics: dict[str, float] | None = None, force: bool = False) -> bool:
    """Starts an asynchronous save; returns whether a save was started.

    `progress` is small JSON run bookkeeping (e.g. training seconds so far); `metrics` the
    step's val scores, which rank it for `best`. A previous save that failed in the
    background raises here, in one line (see `wait`).
    """
    self.wait()
    if not force and not self.manager.should_save(step):
      return False
    args = {"state": ocp.args.StandardSave(state),
            "identity": ocp.args.JsonSave(self.identity),
            "progress": ocp.args.JsonSave(progress or {})}
    if data_iterator is not None:
      args["data"] = grain.PyGrainCheckpointSave(_IteratorSnapshot(data_iterator.get_state()))
    try:
      # Orbax makes the step's directory in a thread that the others wait on for 5 minutes
      # (its coordination timeout) when that fails: a full or read-only disk is found here.
      self._probe_writable()
      scores = None
      if self.best and metrics:
        scores = {k: float(v) for k, v in metrics.items()}
      started = self.manager.save(step, args=ocp.args.Composite(**args), force=force,
                                  metrics=scores)
    except Exception as e:  # pylint: disable=broad-except
      self._raise_if_write_fault(step, e)
      raise
    if started:
      self._unconfirmed = step
    return started

  def wait(self) -> None:
    """Waits for the save in flight. One that failed raises one line, e.g. `no space left on
    DIR: checkpoint 30 not written; the last good checkpoint is 20 (...)`, once: Orbax
    reports a background failure to the first caller only."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      step, self._unconfirmed = self._unconfirmed, None
      self._raise_if_write_fault(step, e)
      raise
    self._unconfirmed = None

  def check(self) -> None:
    """Raises a background save's failure if it has already failed, without waiting for one
    in flight: cheap enough for every step, so a run stops at the next step, not the next
    save."""
    if self._unconfirmed is not None and not self.manager.is_saving_in_progress():
      self.wait()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()
      # Again: a handler still writing when the failure surfaced may have made them since.
      for step in self._failed:
        self._remove_temporaries(step)

  def _probe_writable(self) -> None:
    probe = os.path.join(self.directory, f".write-probe-{jax.process_index()}")
    try:
      with open(probe, "wb") as f:
        f.write(b"\0")
    finally:
      if os.path.exists(probe):
        os.remove(probe)

  def _remove_temporaries(self, step: int) -> None:
    for path in glob.glob(os.path.join(glob.escape(self.directory), f"{step}{_TMP_SUFFIX}*")):
      shutil.rmtree(path, ignore_errors=True)

  def _raise_if_write_fault(self, step: int | None, error: BaseException) -> None:
    """A one-line error for a save the file system refused; returns for other failures."""
    code = _os_errno(error)
    if code is None or step is None:
      return
    self._failed.add(step)
    self._remove_temporaries(step)
    last = max((s for s in self.manager.all_steps() if s != step), default=None)
    what, advice = _WRITE_FAULTS.get(code, (None, "fix that and run again"))
    if what is None:
      head = f"could not write checkpoint {step} to {self.directory}: {os.strerror(code)}"
    else:
      head = f"{what.format(self.directory)}: checkpoint {step} not written"
    resume_hint = "" if last is None else " to resume from it"
    raise JaxsegError(f"{head}; the last good checkpoint is {'none' if last is None else last} "
                      f"({advice}{resume_hint})") from error

  def set_aside(self, steps) -> list[str]:
    """Renames damaged steps to `<step>.damaged` (kept to look at, never listed or restored):
    Orbax would otherwise skip saving those steps again, as not newer than its latest."""
    steps, moved = sorted(steps), []
    for step in steps:
      source, n = os.path.join(self.directory, str(step)), 1
      target = f"{source}.damaged"
      while os.path.exists(target):
        n += 1
        target = f"{source}.damaged{n}"
      moved.append(target)
    key = "_".join(map(str, steps))
    ocp.multihost.sync_global_processes(f"jaxseg_set_aside_{key}_named")
    if jax.process_index() == 0:
      for step, target in zip(steps, moved):
        try:
          os.rename(os.path.join(self.directory, str(step)), target)
        except OSError as e:
          raise JaxsegError(f"checkpoint {step} in {self.directory} is damaged and could not "
                            f"be moved aside ({e.strerror}); move it away and run again") from e
    ocp.multihost.sync_global_processes(f"jaxseg_set_aside_{key}_moved")
    self.manager.reload()
    return moved


def _score(key: str, metrics) -> float:
  """A checkpoint's rank for `best`: its metric, -inf when missing or not finite (a NaN would
  make the order meaningless)."""
  value = (metrics or {}).get(key)
  value = float("-inf") if value is None else float(value)
  return value if math.isfinite(value) else float("-inf")


def _newest_intact(ckpt: Checkpointer, attempt: Callable[[int], Any]):
  """(attempt(step), step, damaged) for the newest step whose attempt does not raise
  `DamagedCheckpoint`; (None, None, []) without checkpoints; a one-line error when every
  checkpoint is damaged. Any other error (another run's checkpoint) is raised at once."""
  damaged = []
  for step in sorted(ckpt.manager.all_steps(), reverse=True):
    try:
      return attempt(step), step, damaged
    except DamagedCheckpoint as e:
      damaged.append(e)
  if damaged:
    raise JaxsegError(
        f"every checkpoint in {ckpt.directory} is damaged ("
        + "; ".join(f"step {e.step}: {e.reason}" for e in damaged)
        + f"); move {ckpt.directory} away to start the run over") from None
  return None, None, []


def _damage_line(ckpt: Checkpointer, damaged, step: int, doing: str) -> str:
  which = ", ".join(str(e.step) for e in damaged)
  why = "; ".join(e.reason if len(damaged) == 1 else f"{e.step}: {e.reason}" for e in damaged)
  return (f"checkpoint{'s' if len(damaged) > 1 else ''} {which} in {ckpt.directory} "
          f"{'are' if len(damaged) > 1 else 'is'} damaged ({why}); {doing} step {step}, the newest "
          f"intact one")


def restore_latest_state(ckpt: Checkpointer, abstract_state, step: int | None = None
                         ) -> tuple[Any, int]:
  """(train state, step) of the newest intact checkpoint, for inference; a damaged newer one
  is passed over with a warning (and left in place: reading changes nothing on disk).

  `abstract_state` is the abstract train state, or a function of a checkpoint's saved
  identity that returns it (a model whose classes come from the checkpoint). `step` asks
  for that checkpoint (e.g. the best one); damaged, the newest intact one is used instead,
  with a warning."""
  def attempt(step):
    target = abstract_state
    if callable(abstract_state):
      target = abstract_state(ckpt.saved_identity(step))
    return ckpt.restore_state(step, target)

  if step is not None:
    try:
      return attempt(step), step
    except DamagedCheckpoint as e:
      logging.warning("%s; using the newest intact checkpoint instead", e)
  state, found, damaged = _newest_intact(ckpt, attempt)
  if found is None:
    raise JaxsegError(f"no checkpoint in {ckpt.directory}")
  if damaged:
    logging.warning("%s", _damage_line(ckpt, damaged, found, "using"))
  return state, found


def resume(ckpt: Checkpointer, state, data_iterator=None):
  """(state, progress, start step): restored from the newest intact checkpoint in `ckpt`
  (state and data position), or `state`, {} and 0 when there is none.

  Damaged newer checkpoints are named in one warning and moved aside (`set_aside`), so the
  run saves those steps again. A failed restore closes the iterator (it may have started
  grain's workers) and the manager before re-raising."""
  try:
    restored, step, damaged = _newest_intact(
        ckpt, lambda s: ckpt.restore(s, state, data_iterator))
    if damaged:
      moved = ckpt.set_aside([e.step for e in damaged])
      logging.warning("%s; moved aside to %s", _damage_line(ckpt, damaged, step, "resuming from"),
                      ", ".join(moved))
  except BaseException:
    if hasattr(data_iterator, "close"):  # jaxseg's loaders have one; grain's own do not
      data_iterator.close()
    ckpt.close()
    raise
  if step is None:
    return state, {}, 0
  state, progress = restored
  start = int(jax.device_get(state.step))
  logging.info("Resumed from %s at step %d", ckpt.directory, start)
  return state, progress, start
