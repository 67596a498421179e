"""Writes a dataset in TFDS format (array_record shards), to be read with no TensorFlow.

Once prepared, a dataset is checked (bad examples stopped at or left out), trains without
listing folders or parsing annotation files, and opens with `tfds.data_source` anywhere.

    python -m jaxseg.data.prepare --dataset=camvid --data_dir=/data/camvid \
        --output_dir=/data/prepared --splits=train,val --skip_bad_examples
    python -m jaxseg.data.prepare --dataset=synthetic --output_dir=/tmp/prepared \
        --dataset_options=image_size=64,num_examples=1000

Writes OUTPUT_DIR/jaxseg_<dataset>/1.0.0/ (see `jaxseg.data.prepared`). Read it back with
`jaxseg.data.prepared.PreparedSource(OUTPUT_DIR, "train")`, or with
`tfds.data_source("jaxseg_camvid", data_dir=OUTPUT_DIR)`.

Storage is lossless. Label maps are PNGs; images are PNGs too (`--encoding=zlib`: raw pixels,
zlib-compressed, which decode ~2x faster and take ~20% more room), except that a source which
offers `image_file(index)` has its JPEG files stored as they are wherever PIL decodes them to
exactly the pixels the source gave (CamVid: 3.5x smaller than PNG, and faster to read).

A killed run resumes: re-run the same command and it goes on at the first unwritten shard (or
does nothing when all is written). Shards are written under a temporary name and renamed when
complete, the progress record is replaced atomically after each, and a split appears in
`dataset_info.json` only after its last shard, so a partial split is never read as complete.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import fcntl
import inspect
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import numpy as np
from absl import logging

from jaxseg import data as data_lib
from jaxseg.data.prepared import DATASET_INFO, MANIFEST, VERSION, import_tfds, tfds_name
from jaxseg.data.records import (ENCODINGS, Encoder, encoded, fsync, shard_path, tfds_features,
                                 write_shard)
from jaxseg.errors import JaxsegError, first_line

DEFAULT_EXAMPLES_PER_SHARD = 256
_FORMAT = "jaxseg.data.prepare/1"
_LOCK = "jaxseg_prepare.lock"
_RESERVED_OPTIONS = {"data_dir": "--data_dir", "skip_bad_examples": "--skip_bad_examples",
                     "split": "--splits"}
# Manifest argument -> the flag that sets it (for "you changed --X" errors).
_FLAGS = {"dataset_options": "--dataset_options", "data_dir": "--data_dir",
          "encoding": "--encoding", "num_shards": "--num_shards",
          "examples_per_shard": "--examples_per_shard",
          "skip_bad_examples": "--skip_bad_examples"}


# ----------------------------------------------------------------------------- options


def _literal(text: str) -> Any:
  lowered = text.lower()
  if lowered in ("true", "false"):
    return lowered == "true"
  if lowered in ("none", "null"):
    return None
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError, MemoryError, RecursionError):
    return text  # a bare word: a string


def parse_options(text: str | None) -> dict[str, Any]:
  """"image_size=64,num_examples=5,preset=hard" -> {"image_size": 64, ...}; tuples allowed."""
  if not text or not text.strip():
    return {}
  options = {}
  for part in re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", text.strip()):
    key, sep, value = part.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
      raise JaxsegError(f"--dataset_options: expected key=value[,key=value...], got {part!r}")
    options[key] = _literal(value.strip())
  return options


def _jsonable(value):
  """The JSON form of an option (tuples become lists), for the record and for comparing."""
  return json.loads(json.dumps(value, default=str))


def _options_text(options: dict) -> str:
  return ",".join(f"{k}={_show(v)}" for k, v in sorted(options.items()))


def _show(value) -> str:
  if isinstance(value, (list, tuple)):
    return "(" + ",".join(_show(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def _factory(dataset: str) -> Callable:
  if dataset not in data_lib.DATASETS:
    raise JaxsegError(f"--dataset: unknown dataset {dataset!r}; valid choices: "
                      f"{', '.join(sorted(data_lib.DATASETS))}")
  entry = data_lib.DATASETS[dataset]
  return getattr(entry, "factory", entry)  # a DatasetSpec or a bare factory


def _source_kwargs(dataset: str, options: dict, data_dir: str | None,
                   skip_bad_examples: bool) -> dict[str, Any]:
  """get_dataset's keyword arguments; unknown or missing options are errors naming the flag."""
  for key in options:
    if key in _RESERVED_OPTIONS:
      raise JaxsegError(f"--dataset_options: set {key} with {_RESERVED_OPTIONS[key]}, not here")
  factory = _factory(dataset)
  kwargs = dict(options)
  try:
    params = inspect.signature(factory).parameters
  except (TypeError, ValueError):  # not introspectable: pass everything, let it complain
    params = None
  if params is not None:
    any_keyword = any(p.kind is p.VAR_KEYWORD for p in params.values())
    names = [n for i, (n, p) in enumerate(params.items())
             if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and i > 0
             and n not in _RESERVED_OPTIONS]
    unknown = [k for k in options if k not in names]
    if unknown and not any_keyword:
      raise JaxsegError(f"--dataset_options: {dataset} has no option {unknown[0]!r}; its "
                        f"options: {', '.join(names) or 'none'}")
    missing = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY
               and p.default is p.empty and n not in options and n not in _RESERVED_OPTIONS]
    if missing:
      raise JaxsegError(f"--dataset_options: {dataset} needs "
                        f"{', '.join(m + '=...' for m in missing)}")
    if skip_bad_examples and ("skip_bad_examples" in params or any_keyword):
      kwargs["skip_bad_examples"] = True
  elif skip_bad_examples:
    kwargs["skip_bad_examples"] = True
  if data_dir is not None:
    kwargs["data_dir"] = data_dir
  return kwargs


# ----------------------------------------------------------------------------- files


def _write_json(path: str, value: dict):
  """Atomically: a reader (or a resumed run) sees the old file or the new one, never half."""
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  fsync(os.path.dirname(path))


@contextlib.contextmanager
def _lock(version_dir: str):
  fd = os.open(os.path.join(version_dir, _LOCK), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise JaxsegError(f"{version_dir} is being written by another `python -m "
                        "jaxseg.data.prepare` right now; wait for it to finish") from None
    yield
  finally:
    os.close(fd)  # also releases the lock (as does the death of the process)


# ----------------------------------------------------------------------------- metadata


def _command(manifest: dict, output_dir: str) -> str:
  args = manifest["arguments"]
  parts = ["python -m jaxseg.data.prepare", f"--dataset={manifest['dataset']}"]
  if args["data_dir"] is not None:
    parts.append(f"--data_dir={shlex.quote(args['data_dir'])}")
  parts.append(f"--output_dir={shlex.quote(output_dir)}")
  parts.append(f"--splits={','.join(manifest['splits'])}")
  if args["dataset_options"]:
    parts.append(f"--dataset_options={shlex.quote(_options_text(args['dataset_options']))}")
  if args["skip_bad_examples"]:
    parts.append("--skip_bad_examples")
  if args["num_shards"] is not None:
    parts.append(f"--num_shards={args['num_shards']}")
  elif args["examples_per_shard"] != DEFAULT_EXAMPLES_PER_SHARD:
    parts.append(f"--examples_per_shard={args['examples_per_shard']}")
  if args["encoding"] != "png":
    parts.append(f"--encoding={args['encoding']}")
  return " ".join(parts)


def _check_arguments(old: dict, new: dict, version_dir: str) -> dict:
  """The arguments to go on with; a changed one is an error naming its flag.

  One change is allowed: adding --skip_bad_examples to go past the bad example that stopped
  the last run (nothing written so far holds a bad example either way).
  """
  for key, flag in _FLAGS.items():
    before, now = old.get(key), new.get(key)
    if before == now or (key == "skip_bad_examples" and now and not before):
      continue
    if key == "dataset_options":
      before, now = _options_text(before or {}), _options_text(now or {})
    raise JaxsegError(
        f"{flag}={now if now is not None else '(not set)'} differs from "
        f"{before if before is not None else '(not set)'} that {version_dir} was written "
        f"with; pass the same value to resume or re-run it, or choose another --output_dir "
        "(nothing was changed)")
  return dict(new, skip_bad_examples=bool(old.get("skip_bad_examples") or
                                          new.get("skip_bad_examples")))


def _class_metadata(source) -> dict[str, Any]:
  class_names = [str(c) for c in getattr(source, "class_names", ())]
  palette = np.asarray(getattr(source, "palette", np.zeros((0, 3))), np.uint8).reshape(-1, 3)
  metadata = {"class_names": class_names,
              "num_classes": int(getattr(source, "num_classes", len(class_names))),
              "palette": palette.tolist(),
              "ignore_index": int(getattr(source, "ignore_index", 255))}
  in_channels, dtype = data_lib.channels(source)
  if (in_channels, dtype) != (3, np.uint8):  # (absent for RGB: earlier manifests stay equal)
    metadata.update(in_channels=in_channels, image_dtype=dtype.name)
  return metadata


def _image_format(classes: dict) -> tuple[int, str]:
  return classes.get("in_channels", 3), classes.get("image_dtype", "uint8")


def _publish(version_dir: str, manifest: dict):
  """Writes the TFDS metadata for the finished splits; dataset_info.json (what makes a split
  readable) last, each file replaced atomically."""
  import_tfds()
  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import dataset_info as info_lib
  from tensorflow_datasets.core import file_adapters
  from tensorflow_datasets.core import naming
  from tensorflow_datasets.core import splits as splits_lib
  from tensorflow_datasets.core import utils
  # pylint: enable=g-import-not-at-top
  name = manifest["name"]
  done = {s: st for s, st in manifest["splits"].items() if st["complete"]}
  template = naming.ShardedFileTemplate(
      data_dir=version_dir, template=naming.DEFAULT_FILENAME_TEMPLATE, dataset_name=name,
      filetype_suffix="array_record")
  split_infos = [
      splits_lib.SplitInfo(name=split, shard_lengths=[s["length"] for s in state["shards"]],
                           num_bytes=sum(s["num_bytes"] for s in state["shards"]),
                           filename_template=template.replace(split=split))
      for split, state in done.items()]
  classes = manifest["classes"]
  metadata = {
      "format": _FORMAT, "dataset": manifest["dataset"],
      "dataset_options": manifest["arguments"]["dataset_options"],
      "encoding": manifest["arguments"]["encoding"], **classes,
      "splits": {split: {"source": state["source"], "source_examples": state["source_examples"],
                         "num_examples": sum(s["length"] for s in state["shards"]),
                         "source_jpegs": sum(s.get("source_jpegs", 0) for s in state["shards"]),
                         "num_skipped": len(_skipped(state)), "skipped": _skipped(state)}
                 for split, state in done.items()}}
  encoding = manifest["arguments"]["encoding"]
  described = ("lossless PNG (images: or the source's JPEG file where it decodes to the same "
               "pixels)" if encoding == "png" else "zlib-compressed raw pixels")
  info = info_lib.DatasetInfo(
      builder=info_lib.DatasetIdentity(name=name, version=utils.Version(VERSION),
                                       data_dir=version_dir, module_name=""),
      features=tfds_features(encoding, classes["class_names"], *_image_format(classes)),
      description=(f"{manifest['dataset']} written by `python -m jaxseg.data.prepare` "
                   f"(images and label maps as {described}; labels are class ids, "
                   f"{classes['ignore_index']} = ignore). Class names, palette, source and "
                   "skipped examples are in metadata.json."),
      supervised_keys=("image", "label"),
      metadata=info_lib.MetadataDict(metadata))
  info.set_file_format(file_adapters.FileFormat.ARRAY_RECORD)
  info.set_splits(splits_lib.SplitDict(split_infos))
  staging = tempfile.mkdtemp(prefix=".publish-", dir=version_dir)
  try:
    info.write_to_directory(staging)
    for file in sorted(os.listdir(staging), key=lambda f: f == DATASET_INFO):
      fsync(os.path.join(staging, file))
      os.replace(os.path.join(staging, file), os.path.join(version_dir, file))
    fsync(version_dir)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _skipped(state: dict) -> list[str]:
  return list(state["listing_skipped"]) + [m for s in state["shards"] if s for m in s["skipped"]]


# ----------------------------------------------------------------------------- preparing


def _num_shards(num_examples: int, num_shards: int | None, examples_per_shard: int) -> int:
  if num_shards is not None:
    return max(1, min(num_shards, num_examples))
  return max(1, -(-num_examples // examples_per_shard))


def prepare(dataset: str, output_dir: str, *, splits: Sequence[str] = ("train", "val"),
            data_dir: str | None = None, dataset_options: dict | None = None,
            skip_bad_examples: bool = False, num_shards: int | None = None,
            examples_per_shard: int = DEFAULT_EXAMPLES_PER_SHARD, encoding: str = "png",
            num_workers: int = 0, progress: bool = True,
            log: Callable[[str], None] = print) -> dict[str, Any]:
  """Writes (or finishes writing) `splits` of `dataset`; returns the per-split summary.

  Returns {"path": version dir, "splits": {split: {"num_examples", "num_shards", "num_bytes",
  "skipped": [messages], "written_now": examples written by this call}}}.
  """
  import_tfds()
  splits = list(dict.fromkeys(s.strip() for s in splits if s.strip()))
  if not splits:
    raise JaxsegError("--splits: name at least one split, e.g. --splits=train,val")
  if encoding not in ENCODINGS:
    raise JaxsegError(f"--encoding: unknown encoding {encoding!r}; valid: {', '.join(ENCODINGS)}")
  if num_shards is not None and num_shards < 1:
    raise JaxsegError(f"--num_shards must be at least 1; got {num_shards}")
  if num_shards is None and examples_per_shard < 1:
    raise JaxsegError(f"--examples_per_shard must be at least 1; got {examples_per_shard}")
  options = dict(dataset_options or {})
  data_dir = os.path.abspath(data_dir) if data_dir else None
  kwargs = _source_kwargs(dataset, options, data_dir, skip_bad_examples)
  output_dir = os.path.abspath(output_dir)
  name = tfds_name(dataset)
  version_dir = os.path.join(output_dir, name, VERSION)
  arguments = {"dataset_options": _jsonable(options), "data_dir": data_dir,
               "encoding": encoding, "num_shards": num_shards,
               "examples_per_shard": None if num_shards is not None else examples_per_shard,
               "skip_bad_examples": bool(skip_bad_examples)}
  created = [d for d in (output_dir, os.path.dirname(version_dir), version_dir)
             if not os.path.isdir(d)]
  os.makedirs(version_dir, exist_ok=True)
  try:
    return _prepare_locked(dataset, splits, kwargs, arguments, output_dir, name, version_dir,
                           num_shards, examples_per_shard, num_workers, progress, log)
  except BaseException:
    # A run that failed before writing anything (a wrong split name, say) leaves nothing.
    if version_dir in created and os.listdir(version_dir) == [_LOCK]:
      os.remove(os.path.join(version_dir, _LOCK))
      for directory in reversed(created):
        with contextlib.suppress(OSError):
          os.rmdir(directory)
    raise


def _prepare_locked(dataset, splits, kwargs, arguments, output_dir, name, version_dir,
                    num_shards, examples_per_shard, num_workers, progress, log):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  with _lock(version_dir):
    manifest_path = os.path.join(version_dir, MANIFEST)
    manifest = None
    if os.path.exists(manifest_path):
      with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
      if manifest.get("format") != _FORMAT or manifest.get("dataset") != dataset:
        raise JaxsegError(f"{version_dir} was written by another version of jaxseg or for "
                          "another dataset; choose another --output_dir (nothing was changed)")
      manifest["arguments"] = _check_arguments(manifest["arguments"], arguments, version_dir)
    elif os.path.exists(os.path.join(version_dir, DATASET_INFO)):
      raise JaxsegError(f"{version_dir} holds a TFDS dataset that `python -m "
                        "jaxseg.data.prepare` did not write; choose another --output_dir "
                        "(nothing was changed)")
    else:
      manifest = {"format": _FORMAT, "dataset": dataset, "name": name, "version": VERSION,
                  "arguments": arguments, "classes": None, "splits": {}, "published": []}
    for file in os.listdir(version_dir):  # leftovers of a killed run
      path = os.path.join(version_dir, file)
      if file.startswith(".publish-"):
        shutil.rmtree(path, ignore_errors=True)
      elif file.endswith(".tmp"):
        os.remove(path)

    def save():
      manifest["command"] = _command(manifest, output_dir)
      _write_json(manifest_path, manifest)

    summary = {}
    for split in splits:
      state = manifest["splits"].get(split)
      if state is not None and state["complete"]:
        summary[split] = _split_summary(state, 0)
        log(f"{name} {split}: already complete")
        continue
      source = data_lib.get_dataset(dataset, split, **kwargs)
      classes = _class_metadata(source)
      if manifest["classes"] is None:
        manifest["classes"] = classes
      elif manifest["classes"] != classes:
        raise JaxsegError(f"{dataset} split {split} has other classes than the splits already "
                          f"in {version_dir} ({classes['class_names']} vs "
                          f"{manifest['classes']['class_names']})")
      total = len(source)
      shards = _num_shards(total, num_shards, examples_per_shard)
      if state is None:
        state = {"source": repr(source), "source_examples": total,
                 "listing_skipped": [str(m) for m in getattr(source, "skipped", ())],
                 "shards": [None] * shards, "complete": False}
        manifest["splits"][split] = state
      elif (state["source_examples"], len(state["shards"])) != (total, shards):
        raise JaxsegError(
            f"{dataset} {split} now has {total} examples but {version_dir} was begun with "
            f"{state['source_examples']}: the data under --data_dir changed; restore it, or "
            "choose another --output_dir (nothing was changed)")
      else:
        state["source"] = repr(source)
        state["listing_skipped"] = [str(m) for m in getattr(source, "skipped", ())]
      save()
      written = _write_split(source, state, version_dir, name, dataset, split, manifest,
                             save, num_workers, progress, tqdm, log)
      state["complete"] = True
      save()
      _publish(version_dir, manifest)
      manifest["published"] = [s for s, st in manifest["splits"].items() if st["complete"]]
      save()
      summary[split] = _split_summary(state, written)
    complete = [s for s, st in manifest["splits"].items() if st["complete"]]
    if complete != manifest.get("published") or not os.path.exists(
        os.path.join(version_dir, DATASET_INFO)):
      _publish(version_dir, manifest)  # a run died between finishing a split and publishing
      manifest["published"] = complete
      save()
  return {"path": version_dir, "name": name, "splits": summary,
          "pending": [s for s, st in manifest["splits"].items() if not st["complete"]]}


def _split_summary(state: dict, written: int) -> dict[str, Any]:
  return {"num_examples": sum(s["length"] for s in state["shards"] if s),
          "source_jpegs": sum(s.get("source_jpegs", 0) for s in state["shards"] if s),
          "num_shards": len(state["shards"]),
          "num_bytes": sum(s["num_bytes"] for s in state["shards"] if s),
          "skipped": _skipped(state), "written_now": written}


def _write_split(source, state, version_dir, name, dataset, split, manifest, save,
                 num_workers, progress, tqdm, log) -> int:
  """Writes the split's missing shards in order, recording each; returns examples written."""
  total, shards = state["source_examples"], len(state["shards"])
  bounds = [total * s // shards for s in range(shards + 1)]
  todo = [s for s in range(shards) if state["shards"][s] is None]
  if len(todo) < shards:
    log(f"{name} {split}: resuming at shard {todo[0] + 1} of {shards}" if todo else
        f"{name} {split}: all shards written")
  classes = manifest["classes"]
  check = {"dataset": dataset, "split": split, "num_classes": classes["num_classes"],
           "ignore_index": classes["ignore_index"]}
  encoder = Encoder(manifest["arguments"]["encoding"], classes["class_names"],
                    *_image_format(classes))
  skip = manifest["arguments"]["skip_bad_examples"]
  indices = [i for s in todo for i in range(bounds[s], bounds[s + 1])]
  done_before = total - len(indices)
  bar = tqdm(total=total, initial=done_before, desc=f"{name} {split}", unit="ex",
             disable=not progress, file=sys.stderr, dynamic_ncols=True)
  results = encoded(source, indices, encoder, check, num_workers)
  written = 0
  try:
    for shard in todo:
      skipped, jpegs = [], [0]

      def records(shard=shard, skipped=skipped, jpegs=jpegs):
        for index in range(bounds[shard], bounds[shard + 1]):
          kind, payload = next(results)
          bar.update(1)
          if kind != "bad":
            jpegs[0] += kind == "jpeg"
            yield payload
            continue
          if not skip:
            raise JaxsegError(
                f"{payload} ({dataset} {split} example {index}); fix or remove it, or re-run "
                f"with --skip_bad_examples to leave bad examples out "
                f"({sum(s is not None for s in state['shards'])} of {shards} shards of "
                f"{split} are written and kept)")
          logging.warning("skipped: %s", payload)
          skipped.append(payload)

      count, size = write_shard(
          shard_path(version_dir, name, split, shard, shards), records())
      written += count
      state["shards"][shard] = {"length": count, "num_bytes": size, "skipped": skipped,
                                "source_jpegs": jpegs[0]}
      save()
  finally:
    results.close()
    bar.close()
  return written


# ----------------------------------------------------------------------------- command line


def _size(num_bytes: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if num_bytes < 1024 or unit == "GiB":
      return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
    num_bytes /= 1024
  return ""


def format_summary(result: dict, output_dir: str, max_messages: int = 20) -> str:
  lines = [f"prepared {result['name']} {VERSION} in {result['path']}"]
  for split, s in result["splits"].items():
    skipped = f", {len(s['skipped'])} skipped" if s["skipped"] else ""
    if s["source_jpegs"]:
      skipped += f", {s['source_jpegs']} images kept as their source JPEG"
    lines.append(f"  {split}: {s['num_examples']} examples in {s['num_shards']} shards "
                 f"({_size(s['num_bytes'])}){skipped}")
  messages = [(split, m) for split, s in result["splits"].items() for m in s["skipped"]]
  if messages:
    lines.append("skipped examples (also listed in metadata.json):")
    lines += [f"  {split}: {m}" for split, m in messages[:max_messages]]
    if len(messages) > max_messages:
      lines.append(f"  ... and {len(messages) - max_messages} more")
  if result["pending"]:
    lines.append(f"still to write: {', '.join(result['pending'])} (a run with those --splits "
                 "finishes them)")
  split = next(iter(result["splits"]))
  lines.append(f"read it with jaxseg.data.prepared.PreparedSource({output_dir!r}, {split!r}) "
               f"or tfds.data_source({result['name']!r}, data_dir={output_dir!r})")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m jaxseg.data.prepare", description=__doc__.splitlines()[0],
      epilog="Re-run the same command to resume after a kill; it does nothing when complete.")
  parser.add_argument("--dataset", required=True,
                      help=f"registered dataset: {', '.join(sorted(data_lib.DATASETS))}")
  parser.add_argument("--data_dir", default=None, help="the dataset's files (on-disk datasets)")
  parser.add_argument("--output_dir", required=True,
                      help="TFDS data dir; the dataset goes to OUTPUT_DIR/jaxseg_DATASET/"
                           f"{VERSION}/")
  parser.add_argument("--splits", default="train,val",
                      help="comma-separated (default: %(default)s)")
  parser.add_argument("--skip_bad_examples", action="store_true",
                      help="leave out unreadable examples (listed in the summary and metadata) "
                           "instead of stopping at the first")
  shard = parser.add_mutually_exclusive_group()
  shard.add_argument("--num_shards", type=int, default=None, help="shards per split")
  shard.add_argument("--examples_per_shard", type=int, default=DEFAULT_EXAMPLES_PER_SHARD,
                     help="examples per shard (default: %(default)s); a resumed run redoes at "
                          "most one shard")
  parser.add_argument("--dataset_options", default="",
                      help="the dataset's options, key=value,... e.g. "
                           "image_size=64,num_examples=1000 for synthetic")
  parser.add_argument("--encoding", choices=ENCODINGS, default="png",
                      help="png: smaller, a standard TFDS image feature (default); zlib: raw "
                           "pixels, ~2x faster to decode, ~20%% larger; both lossless")
  parser.add_argument("--num_workers", type=int, default=0,
                      help="processes decoding and encoding examples (default: 0, in this one)")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  started = time.time()
  try:
    result = prepare(
        args.dataset, args.output_dir, splits=args.splits.split(","), data_dir=args.data_dir,
        dataset_options=parse_options(args.dataset_options),
        skip_bad_examples=args.skip_bad_examples, num_shards=args.num_shards,
        examples_per_shard=args.examples_per_shard, encoding=args.encoding,
        num_workers=args.num_workers, progress=not args.no_progress)
  except (JaxsegError, OSError) as e:  # OSError: permissions, a full disk (resumable too)
    print(f"error: {first_line(e)}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted: re-run the same command to resume at the first unwritten shard",
          file=sys.stderr)
    return 130
  print(format_summary(result, os.path.abspath(args.output_dir)))
  print(f"took {time.time() - started:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
