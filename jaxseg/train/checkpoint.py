"""Orbax checkpoints of the train state, the data iterator position and the model identity.

Saves are asynchronous: the arrays are copied to host memory before `save` returns (so the
state can be donated to the next step right away) and written in the background. Orbax writes
each step into a temporary directory and renames it when complete, so a process killed in the
middle of a save leaves a temporary directory that `latest_step` never returns: the previous
complete step restores.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

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


class Checkpointer:
  """Saves/restores {state, data iterator, identity} under `directory`, keeping the last `keep`."""

  def __init__(self, directory: str, identity: dict[str, Any], *, keep: int = 3,
               async_save: bool = True, sampler=None):
    """`sampler` (the training loader's `pipeline.GlobalBatchSampler`) lets a run resume on
    another number of processes: each process saves its own iterator state, and the one
    for a new layout is rebuilt from the global batches consumed."""
    self.directory = os.path.abspath(directory)
    self.identity = identity
    self.sampler = sampler
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            save_root_metadata=False),
        item_names=("state", "data", "identity", "progress"),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.PyGrainCheckpointHandler(),
                       "identity": ocp.JsonCheckpointHandler(),
                       "progress": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def saved_identity(self, step: int) -> dict[str, Any]:
    """The identity saved with `step`: model, classes, parameter shapes, preprocessing..."""
    return dict(self.manager.restore(step, args=ocp.args.Composite(
        identity=ocp.args.JsonRestore()))["identity"])

  def check_identity(self, step: int) -> None:
    """Raises a one-line error if the checkpoint at `step` belongs to another model."""
    saved = self.saved_identity(step)
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

  def restore(self, step: int, abstract_state, data_iterator=None):
    """(state, progress) at `step`; shardings come from `abstract_state`, and the data
    iterator is moved to the saved position. `progress` is the dict given to `save`."""
    self.check_identity(step)
    args = {"state": ocp.args.StandardRestore(abstract_state),
            "progress": ocp.args.JsonRestore()}
    carried = None
    if data_iterator is not None:
      carried = self._carried_position(step, data_iterator)
      if carried is None:
        args["data"] = grain.PyGrainCheckpointRestore(data_iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    except (ValueError, KeyError, TypeError) as e:  # Orbax/grain mismatch: one line, no traceback
      first = first_line(e)
      raise JaxsegError(f"{self.directory} (step {step}) does not match this run: {first}; use "
                        f"the checkpoint's settings or another --workdir") from e
    if carried is not None:
      data_iterator.set_state(carried)
    return restored["state"], dict(restored["progress"] or {})

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
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def save(self, step: int, state, data_iterator=None, *, progress: dict | None = None,
           force: bool = False) -> bool:
    """Starts an asynchronous save; returns whether a save was started.

    `progress` is small JSON run bookkeeping (e.g. training seconds so far).
    """
    args = {"state": ocp.args.StandardSave(state),
            "identity": ocp.args.JsonSave(self.identity),
            "progress": ocp.args.JsonSave(progress or {})}
    if data_iterator is not None:
      args["data"] = grain.PyGrainCheckpointSave(_IteratorSnapshot(data_iterator.get_state()))
    return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def resume(ckpt: Checkpointer, state, data_iterator=None):
  """(state, progress, start step): restored from the latest checkpoint in `ckpt` (state and
  data position), or `state`, {} and 0 when there is none. A failed restore closes the
  iterator (it may have started grain's workers) and the manager before re-raising."""
  latest = ckpt.latest_step()
  if latest is None:
    return state, {}, 0
  try:
    state, progress = ckpt.restore(latest, state, data_iterator)
  except BaseException:
    if data_iterator is not None:
      data_iterator.close()
    ckpt.close()
    raise
  start = int(jax.device_get(state.step))
  logging.info("Resumed from %s at step %d", ckpt.directory, start)
  return state, progress, start
