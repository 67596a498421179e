"""Multi-process runs on JAX's own runtime (`jax.distributed`), and preemption.

One process per host (a Cloud TPU VM worker, a GPU node, a SLURM task) runs the same command.
After `initialize`, `jax.devices()` lists the devices of every process, `sharding.make_mesh`
spans them all and each jitted step is one program over the whole mesh; each process feeds
only its own rows of the global batch (`pipeline.GlobalBatchSampler`).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import signal
import threading
from typing import Mapping

import jax
from absl import logging
from jax.experimental import multihost_utils

from jaxseg.errors import JaxsegError

SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                   "SLURM_LOCALID")


def on_cloud_tpu_vm() -> bool:
  """A Cloud TPU VM: libtpu is installed and the host has TPU chips."""
  return (importlib.util.find_spec("libtpu") is not None and
          bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")))


def detect_cluster(environ: Mapping[str, str] | None = None,
                   tpu_vm: bool | None = None) -> str | None:
  """The launcher this process runs under, for `jax.distributed.initialize()` to read its
  coordinator, process count and index from: "slurm" (srun with more than one task),
  "open_mpi" (mpirun with more than one rank), "cloud_tpu" (a TPU VM; JAX asks the metadata
  server about the slice's workers), or None: one process, nothing to join."""
  environ = os.environ if environ is None else environ
  if all(k in environ for k in SLURM_VARIABLES) and int(environ["SLURM_NTASKS"]) > 1:
    return "slurm"
  if ("OMPI_MCA_orte_hnp_uri" in environ and
      int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1):
    return "open_mpi"
  if on_cloud_tpu_vm() if tpu_vm is None else tpu_vm:
    return "cloud_tpu"
  return None


def check_process_flags(coordinator_address: str | None, num_processes: int | None,
                        process_id: int | None) -> bool:
  """Whether the flags ask for a multi-process run; one line naming the flag when they are
  incomplete or inconsistent."""
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  if all(v is None for v in given.values()):
    return False
  missing = [f"--{k}" for k, v in given.items() if v is None]
  if missing:
    named = ", ".join(f"--{k}" for k, v in given.items() if v is not None)
    raise JaxsegError(f"{named} also needs {' and '.join(missing)}: every process of a run "
                      "is started with the same --coordinator_address=HOST:PORT and "
                      "--num_processes, and its own --process_id")
  if num_processes < 1:
    raise JaxsegError(f"--num_processes={num_processes} must be at least 1")
  if not 0 <= process_id < num_processes:
    raise JaxsegError(f"--process_id={process_id} must be in [0, {num_processes}) "
                      f"(--num_processes={num_processes})")
  host, _, port = coordinator_address.rpartition(":")
  if not host or not port.isdigit():
    raise JaxsegError(f"--coordinator_address={coordinator_address!r} must be HOST:PORT "
                      "(process 0's host and a free port), e.g. 10.0.0.2:8476")
  return num_processes > 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> str | None:
  """Joins this process to a multi-process run before anything touches a JAX device.

  With the three arguments (all processes get the same coordinator and count, each its own
  id), or automatically under SLURM, Open MPI or on a Cloud TPU VM; a single process does
  nothing. Returns how the run was joined ("flags", "slurm", ...) or None.
  """
  how = ("flags" if check_process_flags(coordinator_address, num_processes, process_id)
         else None)
  if how is None and num_processes is None:
    how = detect_cluster()
  if how is None or jax.distributed.is_initialized():
    return how
  # XLA's CPU client exchanges cross-process collectives through gloo (nothing else ships
  # with jaxlib); GPU (NCCL) and TPU (ICI) clients do not read this.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    if how == "flags":
      jax.distributed.initialize(coordinator_address, num_processes, process_id)
    else:
      jax.distributed.initialize()
  except RuntimeError as e:
    if "before any JAX" in str(e):
      raise JaxsegError("jaxseg.train.distributed.initialize must run before anything uses a "
                        "JAX device (call it first in the program)") from e
    raise
  logging.info("Joined a %d-process run (%s) as process %d", jax.process_count(), how,
               jax.process_index())
  return how


class Preempted(Exception):
  """Training stopped early, at a checkpoint, on a preemption notice (SIGTERM) or Ctrl-C
  (SIGINT): run it again to resume. `exit_code` is 0 for a preemption (the scheduler restarts
  the job) and 130 for Ctrl-C, as a shell reports an interrupted command."""

  def __init__(self, step: int, workdir: str, signum: int = signal.SIGTERM):
    what = "interrupted" if signum == signal.SIGINT else "preempted"
    super().__init__(f"{what}: saved step {step} in {workdir}; run the same command again "
                     "to resume from it")
    self.step, self.workdir = step, workdir
    self.exit_code = 130 if signum == signal.SIGINT else 0


class Preemption:
  """Says at each step boundary whether to save a checkpoint and stop.

  SIGTERM is what Cloud TPU, GKE and SLURM send before they preempt a host. With several
  processes, JAX's preemption sync manager catches it on whichever hosts get it and makes
  every process agree on one step to stop at (`multihost_utils`); a single process needs no
  agreement and catches SIGTERM itself. Ctrl-C (SIGINT) in a single process is caught the
  same way: the run saves at the step it is on instead of dying with a traceback; a second
  Ctrl-C cannot cut the save short either. `reached(step)` must be called at every step by
  every process. Use as a context manager: the previous handlers come back at exit.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self._requested = threading.Event()
    self._previous = {}
    self._shared = jax.process_count() > 1
    self.signum = signal.SIGTERM

  def __enter__(self) -> "Preemption":
    if not self._shared and threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, self._on_signal)
    return self

  def __exit__(self, *exc) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def _on_signal(self, signum, frame) -> None:  # pylint: disable=unused-argument
    if not self._requested.is_set():
      self.signum = signum
    self._requested.set()

  def reached(self, step: int) -> bool:
    if self._shared:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested.is_set()
