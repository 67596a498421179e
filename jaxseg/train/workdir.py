"""A run directory: created and checked writable before anything compiles, and locked while a
run, an evaluation or a prediction writes into it.

The lock is `fcntl.flock` on WORKDIR/.lock, which the kernel drops when the process ends (a
SIGKILL leaves no stale lock); the file names the holder's PID and host for the one-line
refusal. Process 0 of a multi-process run holds it for the whole run (every process writes
its checkpoint shards, but they are one run).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import socket
import tempfile
from typing import Any

import jax
import numpy as np

from jaxseg.errors import JaxsegError
from jaxseg.train.checkpoint import workdir_path

LOCK_FILE = ".lock"

_REASONS = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system",
            errno.EDQUOT: "disk quota exceeded", errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted"}


def reason(error: OSError) -> str:
  """A short, readable cause of a failed write."""
  return _REASONS.get(error.errno, error.strerror or type(error).__name__)


def ensure_writable(path: str, flag: str = "workdir") -> str:
  """Creates `path` if needed and proves it writable with a probe file; one line otherwise."""
  path = workdir_path(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise JaxsegError(f"--{flag}={path} is a file, not a directory; pass a directory")
  try:
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise JaxsegError(f"--{flag}={path} is not writable: {reason(e)}") from None
  return path


class Lock:
  """An exclusive lock on a directory, held until `release()` or the process ends."""

  def __init__(self, path: str, purpose: str, flag: str = "workdir"):
    self.path, self.purpose, self.flag = path, purpose, flag
    self._fd: int | None = None

  def acquire(self) -> "Lock":
    if jax.process_index() != 0:
      return self
    lock_path = os.path.join(self.path, LOCK_FILE)
    try:
      fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise JaxsegError(f"--{self.flag}={self.path} is not writable: {reason(e)}") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = _read_holder(fd)
      os.close(fd)
      raise JaxsegError(
          f"--{self.flag}={self.path} is in use by another jaxseg {holder.get('purpose', 'run')}"
          f" (PID {holder.get('pid', '?')} on host {holder.get('host', '?')}); wait for it to "
          f"finish or use another directory") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "purpose": self.purpose}).encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "Lock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _read_holder(fd: int) -> dict[str, Any]:
  try:
    return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
  except (OSError, ValueError):
    return {}


def check_not_locked(path: str, flag: str) -> None:
  """One line if a run holds `path` (for writers that do not take the lock themselves)."""
  if not os.path.exists(os.path.join(path, LOCK_FILE)):
    return
  with Lock(path, "check", flag):
    pass


def write_json(path: str, value: Any, indent: int = 2) -> None:
  """Writes `value` to `path` by way of a temporary file and a rename, so that a crash or a
  full disk leaves the old file (or none), never half of one; process 0 only."""
  if jax.process_index() != 0:
    return
  tmp = f"{path}.tmp"
  try:
    with open(tmp, "w") as f:
      json.dump(value, f, indent=indent)
    os.replace(tmp, path)
  except OSError as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise JaxsegError(f"could not write {path}: {reason(e)}") from None


CLASSES_FILE = "classes.json"


@dataclasses.dataclass(frozen=True, eq=False)
class Classes:
  """What a run predicts: class names, their colours and the label value that means 'void'."""
  names: tuple[str, ...]
  palette: np.ndarray  # uint8 (K, 3)
  ignore_index: int = 255
  dataset: str = ""

  @classmethod
  def of(cls, source, dataset: str = "") -> "Classes":
    return cls(tuple(source.class_names), np.asarray(source.palette, np.uint8),
               int(source.ignore_index), dataset)

  @classmethod
  def read(cls, workdir: str) -> "Classes | None":
    """WORKDIR/classes.json, or None (runs trained before it was written)."""
    path = os.path.join(workdir, CLASSES_FILE)
    if not os.path.exists(path):
      return None
    with open(path) as f:
      c = json.load(f)
    return cls(tuple(c["class_names"]), np.asarray(c["palette"], np.uint8),
               int(c["ignore_index"]), c.get("dataset", ""))


def save_classes(workdir: str, source, dataset: str) -> None:
  """WORKDIR/classes.json: what prediction needs without the dataset on disk."""
  c = Classes.of(source, dataset)
  write_json(os.path.join(workdir, CLASSES_FILE),
             {"class_names": list(c.names), "palette": c.palette.tolist(),
              "ignore_index": c.ignore_index, "dataset": dataset}, indent=1)
