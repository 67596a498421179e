"""Conversion: source tensors -> the variables of a jaxseg backbone -> an Orbax checkpoint."""

from __future__ import annotations

import hashlib
import os
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxseg.backbones import get_backbone
from jaxseg.errors import JaxsegError
from jaxseg.weights import readers, store
from jaxseg.weights.archs import PREPROCESSING, Arch, get_arch


def _renumber(tensors: dict, prefixes) -> dict:
  """Keras auto-names (conv2d_7, batch_normalization_12) -> conv2d, conv2d_1, ... in order.

  Their numbers count every such layer built before in the Keras session, so the same network
  saved in different sessions numbers them differently; their order is fixed by the topology.
  """
  out = dict(tensors)
  for prefix in prefixes:
    pattern = re.compile(rf"({prefix})(?:_(\d+))?/(.+)")
    matches = {k: m for k in out if (m := pattern.fullmatch(k))}
    found = sorted({int(m.group(2) or 0) for m in matches.values()})
    rename = {n: (f"{prefix}_{i}" if i else prefix) for i, n in enumerate(found)}
    # Renamed into a fresh dict: renaming in place would let conv2d_10 -> conv2d_9 be deleted
    # again when the original conv2d_9 is renamed after it.
    out = {k: v for k, v in out.items() if k not in matches} | {
        f"{rename[int(m.group(2) or 0)]}/{m.group(3)}": out[k] for k, m in matches.items()}
  return out


def _to_jax_layout(arch: Arch, key: str, array: np.ndarray) -> np.ndarray:
  """Source tensor layout -> flax layout (convs are HWIO in flax)."""
  if arch.source == "torch" and array.ndim == 4:  # OIHW -> HWIO (depthwise: C1HW -> HW1C)
    return array.transpose(2, 3, 1, 0)
  if arch.source == "keras" and key.endswith("/depthwise_kernel"):  # HWC1 -> HW1C
    return array.transpose(0, 1, 3, 2)
  return array


def _group(path: tuple[str, ...]) -> tuple[int, int, str]:
  """Progress groups in network order: stem, stage1..4 or block0..20, then Keras's
  auto-named layers (Xception's shortcut projections; every layer of Inception-v3)."""
  m = re.match(r"(stem|stage|block)(\d*)", path[0])
  if not m:
    return 2, 0, "conv2d/batch_normalization layers"
  return (0, 0, "stem") if m.group(1) == "stem" else (1, int(m.group(2)), m.group(0))


def _network_order(full_path):
  """Sort key: natural numbers (block2 < block10), conv before its bn, kernel/scale first."""
  collection, *path, leaf = full_path
  parts = []
  for name in path:
    name = {"conv": "0conv", "bn": "1bn"}.get(name, name)
    parts.append(tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)))
  return parts, {"kernel": 0, "scale": 0, "bias": 1, "mean": 2, "var": 3}.get(leaf, 4), leaf


def map_tensors(arch: Arch, tensors: dict[str, np.ndarray], path: str,
                log: Callable[[str], None] = lambda _: None) -> dict:
  """{"params", "batch_stats"} of the jaxseg backbone, filled from `tensors`; every jaxseg
  variable must find its tensor with the right shape and every tensor must be used."""
  if arch.renumber:
    tensors = _renumber(tensors, arch.renumber)
  module = get_backbone(arch.backbone)(**arch.kwargs)
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                                train=False))
  flat = traverse_util.flatten_dict(abstract)  # (collection, *module path, leaf) -> shape
  used, out = set(), {}
  groups: dict[tuple, list] = {}
  for full_path, leaf in flat.items():
    groups.setdefault(_group(full_path[1:]), []).append((full_path, leaf))
  for items in groups.values():
    items.sort(key=lambda item: _network_order(item[0]))
  for n, ((*_, group), items) in enumerate(sorted(groups.items()), 1):
    values = 0
    for full_path, leaf in items:
      key = arch.source_key(full_path[1:])
      name = "/".join(full_path)
      if key not in tensors:
        raise JaxsegError(f"{path}: no tensor {key!r} (for jaxseg {name}); is this a "
                          f"{arch.source} {arch.name} file (--arch)?")
      array = _to_jax_layout(arch, key, np.asarray(tensors[key]))
      if array.shape != leaf.shape:
        raise JaxsegError(f"{path}: tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                          f"jaxseg {name} needs {leaf.shape} (wrong --arch?)")
      out[full_path] = array.astype(np.float32)
      used.add(key)
      values += array.size
    log(f"[{n:2d}/{len(groups)}] {group:<10} {len(items):4d} tensors {values:>12,} values")
  ignore = re.compile(arch.ignore)
  unused = [k for k in tensors if k not in used and not ignore.fullmatch(k)]
  if unused:
    raise JaxsegError(f"{path}: unknown key {unused[0]!r} ({len(unused)} tensors not part of "
                      f"the {arch.backbone} trunk; wrong --arch or an unknown key layout?)")
  return traverse_util.unflatten_dict(out)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def convert_file(source: str, arch_name: str, input_path: str, output_dir: str,
            log: Callable[[str], None] = lambda _: None) -> dict:
  """Reads `input_path`, maps it onto the jaxseg backbone, writes `output_dir`; returns the
  metadata. Nothing is written unless every tensor maps."""
  arch = get_arch(source, arch_name)
  if os.path.exists(output_dir):
    raise JaxsegError(f"{output_dir}: already exists; choose a new output directory")
  tensors = readers.read(source, input_path)
  log(f"read {len(tensors)} tensors from {input_path}")
  variables = map_tensors(arch, tensors, input_path, log)
  counts = {c: sum(x.size for x in jax.tree.leaves(v)) for c, v in variables.items()}
  metadata = {
      "source": source, "arch": arch_name, "backbone": arch.backbone,
      "backbone_kwargs": arch.kwargs, "preprocessing": PREPROCESSING[arch.preprocessing],
      "preprocessing_name": arch.preprocessing, "input_file": os.path.basename(input_path),
      "input_sha256": _sha256(input_path),
      "num_tensors": len(jax.tree.leaves(variables)), "num_values": counts,
  }
  metadata = store.save_pretrained(output_dir, variables, metadata)
  ignored = len(tensors) - metadata["num_tensors"]
  log(f"mapped {metadata['num_tensors']} tensors ({counts.get('params', 0):,} parameters, "
      f"{counts.get('batch_stats', 0):,} BatchNorm statistics) onto jaxseg {arch.backbone}; "
      f"ignored {ignored} (classifier, BN counters); input {arch.preprocessing!r} "
      f"preprocessing; wrote {output_dir}")
  return metadata
