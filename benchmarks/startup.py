"""Start-up time: `experiments.predict` on one image, and the time to the first train step, with
the compilation cache cold, warm and off.

    python benchmarks/startup.py                       # this checkout, 3 repeats
    python benchmarks/startup.py --breakdown           # and every compilation of one run each
    git worktree add /tmp/before HEAD~20               # "before": an older checkout's code,
    python benchmarks/startup.py --repo=/tmp/before --repo=. --settings=warm,off
                                                       # alternating with this one's

Each command runs as a fresh process, in the checkout `--repo` with `--python`:

  predict      `python -m experiments.predict --workdir=RUN IMAGE` on one 64x64 PNG, RUN a
               2-step `experiments.unet --variant=unet` run made at the start; the wall time of
               the whole process.
  first step   `python -m experiments.unet --variant=unet` (synthetic data, a fresh workdir): the
               time from the process's start until the progress bar first advances, which is when
               the loop has fetched step 1's loss (so step 1 has run). The process is ended there,
               so the evaluation that follows does not count; nothing in the training loop is
               changed: a small wrapper run with `python -c` (WRAPPER below) notes the time in
               tqdm's `update`, and every compilation JAX reports (jax.monitoring).

and each setting has its own XDG_CACHE_HOME, so jaxseg's default cache directory
(jaxseg/runtime.py) is a fresh one, or one filled by a run of each command beforehand:

  cold   an empty cache: the first run ever (compiles, and writes the cache)
  warm   the cache the previous runs of the same command filled
  off    JAXSEG_COMPILATION_CACHE=0

Any JAX_COMPILATION_CACHE_* of the caller is removed from the commands' environment. A checkout
that predates the cache has none in any setting (the "used" column says so): its rows are all
samples of "before". The (checkout, setting) pairs alternate, repeat r running them in an order
rotated by r, so that a busy machine's load falls on all of them alike; medians, with the
range, are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib

SETTINGS = ("cold", "warm", "off")
COMMANDS = ("predict", "first step")
_CACHE_VARIABLES = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "JAX_COMPILATION_CACHE_MAX_SIZE",
                    "JAX_ENABLE_COMPILATION_CACHE", "JAXSEG_COMPILATION_CACHE")

# Runs `python -m MODULE ARGS` (sys.argv[1:]) in this process, noting in $STARTUP_OUT (JSON) the
# seconds since $STARTUP_T0 at which tqdm's "train" bar first advanced, and JAX's compilations.
WRAPPER = r"""
import atexit, json, os, runpy, sys, time
t0 = float(os.environ["STARTUP_T0"])
record = {"first_step": None, "compiles": [], "cache_hits": 0}
import jax
from jax import monitoring
def span(event, start, end, **kwargs):
  if event.endswith("/backend_compile_duration"):
    record["compiles"].append([kwargs.get("fun_name", "?"), start - t0, end - start])
monitoring.register_event_time_span_listener(span)
def event(name, **kwargs):
  if name.endswith("/compilation_cache/cache_hits"):
    record["cache_hits"] += 1
monitoring.register_event_listener(event)
def save():
  record["cache_dir"] = jax.config.jax_compilation_cache_dir
  record["exit"] = time.time() - t0
  with open(os.environ["STARTUP_OUT"], "w") as f:
    json.dump(record, f)
import tqdm
update = tqdm.tqdm.update
def noted_update(self, n=1):
  out = update(self, n)
  if str(self.desc).startswith("train") and self.n > (self.initial or 0):
    record["first_step"] = time.time() - t0
    if os.environ.get("STARTUP_STOP_AT_FIRST_STEP") == "1":
      save()
      sys.stdout.flush(); sys.stderr.flush()
      os._exit(0)
  return out
tqdm.tqdm.update = noted_update
atexit.register(save)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def write_png(path: pathlib.Path, size: int = 64) -> None:
  """An RGB test image, without needing Pillow in this process."""
  rows = b"".join(  # each row: filter type 0, then R, G, B per pixel
      b"\0" + b"".join(bytes((x * 4 % 256, y * 4 % 256, (x + y) * 2 % 256))
                       for x in range(size)) for y in range(size))

  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data +
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

  path.write_bytes(b"\x89PNG\r\n\x1a\n" +
                   chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)) +
                   chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


class Bench:
  """The runs of one checkout, in a temporary directory of their own."""

  def __init__(self, python: str, repo: str, tmp: str | None):
    self.python, self.repo = python, os.path.abspath(repo)
    self.label = os.path.basename(self.repo.rstrip(os.sep)) or self.repo
    self.root = pathlib.Path(tempfile.mkdtemp(prefix="jaxseg-startup-", dir=tmp))
    self.count = 0
    self.run_dir = self.root / "run"
    self.image = self.root / "image.png"
    self.warm = {c: self.root / f"cache-warm-{i}" for i, c in enumerate(COMMANDS)}

  def env(self, setting: str, cache_home: pathlib.Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CACHE_VARIABLES}
    env["XDG_CACHE_HOME"] = str(cache_home)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if setting == "off":
      env["JAXSEG_COMPILATION_CACHE"] = "0"
    return env

  def argv(self, command: str) -> list[str]:
    self.count += 1
    if command == "predict":
      return ["experiments.predict", f"--workdir={self.run_dir}",
              f"--out_dir={self.root / 'out'}", str(self.image)]
    return ["experiments.unet", "--variant=unet", "--config.train.steps=2",
            f"--workdir={self.root / f'train{self.count}'}"]

  def run(self, command: str, setting: str, cache_home: pathlib.Path) -> dict:
    """One fresh process; {"seconds": the figure, "compile": seconds compiling, "hits": ...}."""
    out = self.root / f"record{self.count}.json"
    env = self.env(setting, cache_home)
    env.update(STARTUP_OUT=str(out), STARTUP_STOP_AT_FIRST_STEP="1")
    argv = [self.python, "-c", WRAPPER, *self.argv(command)]
    env["STARTUP_T0"] = repr(time.time())
    t0 = time.perf_counter()
    done = subprocess.run(argv, cwd=self.repo, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0 or not out.exists():
      raise SystemExit(f"{' '.join(argv[3:])} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    record = json.loads(out.read_text())
    seconds = wall if command == "predict" else record["first_step"]
    if seconds is None:
      raise SystemExit(f"{' '.join(argv[3:])}: no train progress bar seen; stderr:\n"
                       f"{done.stderr[-3000:]}")
    return {"seconds": seconds, "wall": wall, "record": record,
            "compile": sum(c[2] for c in record["compiles"]), "hits": record["cache_hits"],
            "cached": record["cache_dir"] is not None}

  def prepare(self) -> None:
    write_png(self.image)
    off = self.root / "cache-off"
    done = subprocess.run(
        [self.python, "-m", "experiments.unet", "--variant=unet", "--config.train.steps=2",
         f"--workdir={self.run_dir}"], cwd=self.repo, env=self.env("off", off),
        capture_output=True, text=True)
    if done.returncode != 0:
      raise SystemExit(f"making the run failed:\n{done.stderr[-3000:]}")


def _fmt(values: list[float]) -> str:
  if len(values) == 1:
    return f"{values[0]:.2f}"
  return f"{statistics.median(values):.2f} ({min(values):.1f}-{max(values):.1f})"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--python", default=sys.executable, help="The interpreter to run.")
  parser.add_argument("--repo", action="append", default=None,
                      help="The checkout whose experiments run (default: this one); give it "
                      "twice, e.g. an older worktree and this one, to time both alternately.")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--settings", default=",".join(SETTINGS),
                      help=f"Comma-separated, of {', '.join(SETTINGS)}.")
  parser.add_argument("--breakdown", action="store_true",
                      help="Also list every compilation of the first repeat's runs.")
  parser.add_argument("--tmp", default=None, help="Where the runs and caches go (then removed).")
  parser.add_argument("--keep", action="store_true", help="Keep the temporary directory.")
  args = parser.parse_args(argv)
  settings = [s for s in args.settings.split(",") if s]
  for s in settings:
    if s not in SETTINGS:
      parser.error(f"unknown setting {s!r}")
  repos = args.repo or [str(pathlib.Path(__file__).resolve().parents[1])]

  load = os.getloadavg()[0]
  started = time.perf_counter()
  benches = [Bench(args.python, repo, args.tmp) for repo in repos]
  for i, bench in enumerate(benches):
    if [b.label for b in benches].count(bench.label) > 1:
      bench.label += f"#{i + 1}"
  print(f"python {args.python}, {os.cpu_count()} CPUs, load average {load:.1f} at the start",
        flush=True)
  cases = [(b, s) for b in benches for s in settings]
  results = {(b.label, s, c): [] for b, s in cases for c in COMMANDS}
  try:
    for bench in benches:
      print(f"{bench.label}: {bench.repo}, work in {bench.root}", flush=True)
      bench.prepare()
      if "warm" in settings:  # one untimed run of each command fills its warm cache
        for command in COMMANDS:
          bench.run(command, "warm", bench.warm[command])
    for r in range(args.repeats):
      for bench, setting in cases[r % len(cases):] + cases[:r % len(cases)]:
        for command in COMMANDS:
          home = (bench.warm[command] if setting == "warm" else
                  bench.root / f"cache-{setting}-{r}-{bench.count}")
          result = bench.run(command, setting, home)
          results[bench.label, setting, command].append(result)
          print(f"  repeat {r + 1} {bench.label} {setting:4s} {command:10s} "
                f"{result['seconds']:6.2f} s (XLA {result['compile']:5.2f} s, "
                f"{result['hits']} cache hits)", flush=True)
          if args.breakdown and r == 0:
            for name, at, seconds in result["record"]["compiles"]:
              print(f"      at {at:6.2f} s  {seconds:6.2f} s  {name}")
  finally:
    for bench in benches:
      if not args.keep:
        shutil.rmtree(bench.root, ignore_errors=True)

  print(f"\nmedian (range) of {args.repeats} run(s), seconds; load average "
        f"{load:.1f} -> {os.getloadavg()[0]:.1f}; {time.perf_counter() - started:.0f} s in all; "
        "XLA: the median seconds in XLA's compile step, cache reads included")
  width = max([len("checkout")] + [len(b.label) for b in benches])
  print(f"{'checkout':{width}s} {'cache':5s} {'used':4s} | {'predict, 1 image':18s} {'XLA':>5s} | "
        f"{'to 1st train step':18s} {'XLA':>5s}")
  for bench, setting in cases:
    cells = []
    for command in COMMANDS:
      rows = results[bench.label, setting, command]
      cells.append(f"{_fmt([x['seconds'] for x in rows]):18s} "
                   f"{statistics.median(x['compile'] for x in rows):5.1f}")
    used = all(x["cached"] for c in COMMANDS for x in results[bench.label, setting, c])
    print(f"{bench.label:{width}s} {setting:5s} {'yes' if used else 'no':4s} | {cells[0]} | "
          f"{cells[1]}")


if __name__ == "__main__":
  main()
