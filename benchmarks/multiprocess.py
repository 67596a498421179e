"""One run as 1 process x 4 devices and as 2 processes x 2 devices, and a SIGTERM'd run.

    python benchmarks/multiprocess.py --steps=40

`python -m experiments.unet` (a narrow U-Net on the synthetic shapes, CPU devices) runs:
  1. as one process with 4 devices;
  2. as two processes with 2 devices each, joined by --coordinator_address (gloo collectives
     over localhost), as hosts of a pod would be;
  3. as two processes again, with SIGTERM sent to process 0 once `--preempt_after` steps are
     logged; then the same command again, which resumes.
It prints each layout's training time and images/s, the largest loss difference from the
one-process run over all metrics.jsonl rows, the seconds from SIGTERM to both processes'
exit, and the step they saved. All processes share this machine's cores, so the ratio is the
cost of cross-process collectives (gloo over TCP) against in-process ones, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _flags(args) -> list[str]:
  return ["--variant=unet", f"--config.model.features={args.features}",
          "--config.model.depth=3", "--config.model.dtype=float32",
          f"--config.data.image_size={args.image_size}", f"--config.train.steps={args.steps}",
          "--config.train.batch_size=8", "--config.train.checkpoint_every=10",
          "--config.train.log_every=1", "--config.train.num_eval_examples=16",
          "--config.optim.warmup_steps=0"]


def _start(args, workdir, processes: int, devices: int) -> list[subprocess.Popen]:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  started = []
  for p in range(processes):
    extra = ([f"--coordinator_address=localhost:{port}", f"--num_processes={processes}",
              f"--process_id={p}"] if processes > 1 else [])
    started.append(subprocess.Popen(
        [sys.executable, "-m", "experiments.unet", *_flags(args), f"--workdir={workdir}",
         *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True))
  return started


def _wait(started) -> list[tuple[int, str, str]]:
  outputs = [p.communicate() for p in started]
  for p, (_, err) in zip(started, outputs):
    if p.returncode:
      sys.exit(f"a process failed ({p.returncode}):\n{err[-3000:]}")
  return [(p.returncode, *o) for p, o in zip(started, outputs)]


def _rows(workdir) -> dict[int, dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return {}
  return {r["step"]: r for r in map(json.loads, path.read_text().splitlines()) if r}


def _max_loss_difference(rows, reference, last_step=None) -> float:
  """The largest |loss difference| over the steps both logged (up to `last_step`)."""
  return max(abs(rows[s]["loss"] - reference[s]["loss"]) for s in reference
             if "loss" in reference[s] and s in rows and (last_step is None or s <= last_step))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--features", type=int, default=16)
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--preempt_after", type=int, default=10, help="logged steps")
  parser.add_argument("--workdir", default=None, help="default: a temporary directory")
  args = parser.parse_args()
  root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="jaxseg-multiprocess-"))
  layouts = {"1 process x 4 devices": (1, 4), "2 processes x 2 devices": (2, 2)}
  summaries, rows = {}, {}
  for name, (processes, devices) in layouts.items():
    workdir = root / name.split()[0]
    _wait(_start(args, workdir, processes, devices))
    summaries[name] = json.loads((workdir / "summary.json").read_text())
    rows[name] = _rows(workdir)
    print(f"{name}: trained in {summaries[name]['train_seconds']:.1f} s, "
          f"{summaries[name]['images_per_second']:.1f} images/s, "
          f"mIoU {summaries[name]['miou']:.4f}", flush=True)
  one, two = layouts
  # Same batches, other summation order of the gradients (gloo vs in-process): equal at
  # first, then apart by float rounding that training amplifies step by step.
  print(f"2-process / 1-process images/s: "
        f"{summaries[two]['images_per_second'] / summaries[one]['images_per_second']:.2f}; "
        f"largest |loss difference| over steps 1-3: "
        f"{_max_loss_difference(rows[two], rows[one], 3):.2e}, over all {len(rows[one])}: "
        f"{_max_loss_difference(rows[two], rows[one]):.2e}")

  workdir = root / "preempted"
  started = _start(args, workdir, 2, 2)
  while len(_rows(workdir)) < args.preempt_after:
    if any(p.poll() is not None for p in started):
      sys.exit("the run ended before it was preempted; raise --steps")
    time.sleep(0.05)
  t, logged = time.perf_counter(), len(_rows(workdir))
  started[0].send_signal(signal.SIGTERM)
  results = _wait(started)
  seconds = time.perf_counter() - t
  saved = [line for _, out, _ in results for line in out.splitlines() if "preempted" in line]
  # Rows are written one step behind the device, so step `logged + 1` is the one running.
  print(f"SIGTERM to process 0 with {logged} steps logged: both processes exited 0 in "
        f"{seconds:.1f} s; {saved[0] if saved else 'no checkpoint line'}")
  t = time.perf_counter()
  _wait(_start(args, workdir, 2, 2))
  resumed = json.loads((workdir / "summary.json").read_text())
  print(f"resumed from step {resumed['resumed_from']} to {resumed['steps']} in "
        f"{time.perf_counter() - t:.1f} s (start-up and compilation included); largest "
        f"|loss difference| from the uninterrupted run: "
        f"{_max_loss_difference(_rows(workdir), rows[two]):.2e}; mIoU {resumed['miou']:.4f} "
        f"vs {summaries[two]['miou']:.4f}")
  print(f"runs in {root}")


if __name__ == "__main__":
  main()
