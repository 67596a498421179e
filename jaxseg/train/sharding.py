"""Data parallelism on a 1-D ("data",) device mesh: batch sharded, state replicated.

This is the jit form of pmap: one program over every device of every process. Collectives
(the gradient all-reduce, BatchNorm's global batch statistics) are inserted by XLA from the
shardings, so no axis names appear in model or step code.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxseg.errors import JaxsegError

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all devices (of all processes) along the data axis.

  Devices are ordered by process, so process p holds the p-th block of every global batch:
  the rows its loader reads (`pipeline.GlobalBatchSampler`).
  """
  devices = jax.devices() if devices is None else list(devices)
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  # Auto axes: shardings propagate through the model without explicit-sharding annotations.
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device (parameters, optimizer state, scalars)."""
  return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh, flag: str = "train.batch_size") -> int:
  """Per-process batch size; a clear error when the global batch does not split evenly."""
  n = mesh.devices.size
  if global_batch_size <= 0 or global_batch_size % n:
    lower = max(n, global_batch_size // n * n)
    raise JaxsegError(
        f"--config.{flag}={global_batch_size} is not divisible by the {n} devices of the mesh; "
        f"use a multiple of {n} (e.g. {lower} or {lower + n}) or run on fewer devices")
  return global_batch_size // jax.process_count()


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, Any]:
  """Assembles the global batch from this process's slice, sharded along the batch axis."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
