"""Pretrained backbone checkpoints: Orbax directories with `variables` and `metadata` items.

    OUTPUT_DIR/variables/   {"params": ..., "batch_stats": ...} of the backbone (Orbax PyTree)
    OUTPUT_DIR/metadata/    JSON: source, arch, backbone + kwargs, preprocessing, input file hash

Orbax writes into a temporary directory and renames it when complete, so an interrupted
conversion never leaves a directory that looks like a checkpoint.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxseg.backbones import get_backbone
from jaxseg.data.preprocess import make_normalize
from jaxseg.errors import JaxsegError

FORMAT = "jaxseg-pretrained-backbone/1"


def _checkpointer() -> ocp.Checkpointer:
  """Knows both items, so that reading only the metadata restores (and warns about) nothing else."""
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
    registry.add("variables", args, ocp.StandardCheckpointHandler)
  for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
    registry.add("metadata", args, ocp.JsonCheckpointHandler)
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=registry))


def save_pretrained(directory: str, variables: dict, metadata: dict[str, Any]) -> dict:
  """Writes the checkpoint; returns the metadata as stored (with its format tag)."""
  metadata = {"format": FORMAT, **metadata}
  directory = os.path.abspath(directory)
  if os.path.exists(directory):
    raise JaxsegError(f"{directory}: already exists; choose a new output directory")
  with _checkpointer() as checkpointer:
    checkpointer.save(directory, args=ocp.args.Composite(
        variables=ocp.args.StandardSave(variables),
        metadata=ocp.args.JsonSave(metadata)))
  return metadata


def read_metadata(directory: str) -> dict[str, Any]:
  """The metadata item; a one-line error if `directory` is not a converted backbone."""
  directory = os.path.abspath(directory)
  if not os.path.isdir(os.path.join(directory, "metadata")):
    raise JaxsegError(f"{directory}: not a pretrained backbone (no metadata/; make one with "
                      "python -m jaxseg.weights.convert)")
  with _checkpointer() as checkpointer:
    metadata = checkpointer.restore(directory, args=ocp.args.Composite(
        metadata=ocp.args.JsonRestore()))["metadata"]
  if metadata.get("format") != FORMAT:
    raise JaxsegError(f"{directory}: metadata format {metadata.get('format')!r}, expected "
                      f"{FORMAT!r}")
  return metadata


def load_pretrained(directory: str) -> tuple[dict, dict[str, Any]]:
  """(variables as numpy arrays, metadata)."""
  metadata = read_metadata(directory)
  with _checkpointer() as checkpointer:
    variables = checkpointer.restore(os.path.abspath(directory))["variables"]
  return jax.tree.map(np.asarray, variables), metadata


def make_preprocess(spec: dict[str, Any]) -> Callable[[jax.Array], jax.Array]:
  """uint8 RGB (..., 3) -> float32 input of the source network (channel order, mean, std)."""
  normalize = make_normalize(spec["mean"], spec["std"])
  if spec["channels"] == "BGR":
    return lambda images: normalize(images[..., ::-1])
  return normalize


def backbone_factory(metadata: dict[str, Any]):
  """The registered backbone with the constructor kwargs that make it match the source."""
  return get_backbone(metadata["backbone"]), dict(metadata["backbone_kwargs"])


def load_backbone(directory: str, *, output_stride: int = 32, dtype: Any = jnp.float32):
  """(module, variables, preprocess) of a converted backbone.

  `module.apply(variables, preprocess(images_uint8), train=False)` returns the stage-feature
  dict; at the default output stride 32 (the source network's own) its "stage4" is the source
  network's final feature map.
  """
  variables, metadata = load_pretrained(directory)
  factory, kwargs = backbone_factory(metadata)
  module = factory(output_stride=output_stride, dtype=dtype, **kwargs)
  return module, variables, make_preprocess(metadata["preprocessing"])
