"""Run outputs: metrics.jsonl, TensorBoard events and a progress bar (process 0 writes)."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import jax
import numpy as np
import tqdm

from jaxseg.errors import JaxsegError


def _plain(value):
  """JSON-friendly python scalars / lists from numpy or jax values."""
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  value = np.asarray(value)
  if value.ndim:
    return value.tolist()
  value = value.item()
  return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricWriter:
  """Appends one JSON object per logged step; mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, *, resume_step: int = 0):
    self.active = jax.process_index() == 0
    self.resume_step = resume_step
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self._logged: dict[int, set[str]] = {}  # keys already in the file, by step (<= resume)
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._truncate_after(resume_step)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    # purge_step: TensorBoard drops events after the checkpoint we resume from, as we do above.
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                             purge_step=resume_step + 1 if resume_step else None)

  def _truncate_after(self, step: int) -> None:
    """Drops rows logged after the checkpoint we resume from: they will be logged again."""
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      rows = [line for line in f if line.strip()]
    keep = []
    for line in rows:
      try:
        row = json.loads(line)
      except ValueError:  # a line cut short by a kill mid-write
        continue
      if row.get("step", 0) <= step:
        keep.append(line if line.endswith("\n") else line + "\n")
        self._logged.setdefault(row["step"], set()).update(row)
    if keep != rows:
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(keep)
      os.replace(tmp, self.path)  # atomic: a crash here never loses the old rows

  def logged(self, step: int) -> set[str]:
    """The keys already written for `step` (by this run or, up to the resumed step, before)."""
    return self._logged.get(step, set())

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Appends a row. Up to the resumed step, only keys the file lacks for that step are
    written: a killed run's missing evaluation is added, nothing is written twice."""
    if not self.active:
      return
    scalars = {k: v for k, v in scalars.items() if k not in self.logged(step)}
    if not scalars:
      return
    row = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
    try:
      with open(self.path, "a") as f:
        f.write(json.dumps(row) + "\n")
    except OSError as e:
      raise JaxsegError(f"could not write step {step} to {self.path}: "
                        f"{e.strerror or type(e).__name__}") from None
    self._logged.setdefault(int(step), set()).update(row)
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
        self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self._tb is None:
      return
    writers = list((self._tb.all_writers or {}).values())
    try:
      self._tb.close()
    except OSError:  # a full or read-only disk: the run reports that already, in one line
      # tensorboardX would try the same flush again at exit and print its traceback.
      for writer in writers:
        writer.event_writer._closed = True  # pylint: disable=protected-access
    self._tb = None


class Progress:
  """tqdm bar over steps with loss, learning rate and images/s; ETA comes from tqdm."""

  def __init__(self, total: int, initial: int, batch_size: int, desc: str = "train"):
    self.batch_size = batch_size
    self.bar = tqdm.tqdm(total=total, initial=initial, desc=desc, unit="step",
                         dynamic_ncols=True, disable=jax.process_index() != 0,
                         mininterval=1.0)
    self._last = (time.perf_counter(), initial)

  def update(self, step: int, loss: float, learning_rate: float | None = None) -> None:
    now = time.perf_counter()
    t0, s0 = self._last
    ips = (step - s0) * self.batch_size / max(now - t0, 1e-9)
    self._last = (now, step)
    shown = {"loss": f"{loss:.4f}", "img_s": f"{ips:.1f}"}
    if learning_rate is not None:
      shown["lr"] = f"{learning_rate:.2e}"
    self.bar.set_postfix(shown, refresh=False)
    self.bar.update(step - self.bar.n)

  def write(self, message: str) -> None:
    self.bar.write(message)

  def close(self) -> None:
    self.bar.close()
