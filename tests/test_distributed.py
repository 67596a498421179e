"""Multi-process training on one machine: 2 processes x 2 CPU devices (gloo collectives over
localhost) against 1 process x 4 devices, SIGTERM preemption and resume on another layout.

The runs are `python -m experiments.unet` with the multi-process flags, as on a pod; every
process is started in its own session and killed with its children when a test ends.
"""

import contextlib
import itertools
import json
import os
import pathlib
import random
import socket
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxseg import norm
from jaxseg.data import pipeline
from jaxseg.data.synthetic import SyntheticShapes
from jaxseg.errors import JaxsegError
from jaxseg.train import distributed
from jaxseg.train.checkpoint import Checkpointer
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 6
# A narrow U-Net on the synthetic shapes: a global batch of 8 over 4 devices.
FLAGS = ("--variant=unet", "--config.model.features=8", "--config.model.depth=2",
         "--config.model.dtype=float32", "--config.data.image_size=32",
         f"--config.train.steps={STEPS}", "--config.train.batch_size=8",
         "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=5",
         "--config.train.log_every=1", "--config.train.num_eval_examples=8",
         "--config.train.num_prediction_images=2", "--config.optim.warmup_steps=0")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def _processes(workdir, processes: int, devices: int, *, pause_at=None):
  """Starts the run as `processes` processes of `devices` CPU devices each; yields the Popens,
  all gone (with their grain workers) afterwards."""
  port = _free_port()
  # BatchNorm's sums as plain reductions, as on GPU/TPU: CPU's dot sums split over each
  # process's threads, and those rounding differences would blur what this compares (the
  # data, sharding and collectives of 2 processes vs 1) from ~1e-7 to ~1e-4 (norm.sum_rows).
  env = dict(helpers.device_env(devices), **{norm.DOT_SUMS: "0"})
  command = [sys.executable, "-m", "experiments.unet"]
  if pause_at is not None:
    command, env = helpers.paused_at("experiments.unet", pause_at, f"{workdir}.paused", env)
  runs = []
  for p in range(processes):
    extra = ([f"--coordinator_address=localhost:{port}", f"--num_processes={processes}",
              f"--process_id={p}"] if processes > 1 else [])
    runs.append(([*command, *FLAGS, f"--workdir={workdir}", *extra], env))
  with helpers.processes_in_sessions(runs) as started:
    yield started


def _train(workdir, processes, devices):
  with _processes(workdir, processes, devices) as started:
    results = helpers.finish(started)
  for code, _, err in results:
    assert code == 0, err[-3000:]
  return results


def _rows(workdir):
  return [json.loads(r) for r in (pathlib.Path(workdir) / "metrics.jsonl").read_text().split("\n")
          if r]


def _state(workdir, step=STEPS):
  """The saved train state as host arrays (it was saved over another set of devices)."""
  import jax  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(workdir) / "checkpoints" / str(step) / "state"
  checkpointer = ocp.StandardCheckpointer()
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                        checkpointer.metadata(path).item_metadata)
  return checkpointer.restore(path, target)


def _assert_same_rows(rows, reference):
  assert [r["step"] for r in rows] == [r["step"] for r in reference]
  for row, ref in zip(rows, reference):
    assert row.keys() == ref.keys(), row["step"]
    for key in row:
      np.testing.assert_allclose(row[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=key)


def _assert_same_state(workdir, reference, step=STEPS):
  import jax  # pylint: disable=g-import-not-at-top
  a, b = _state(workdir, step), _state(reference, step)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    # Gradients are summed in another order across processes (gloo), and Adam turns a
    # last-bit difference in a near-zero gradient into up to ~1e-6 of a parameter; other
    # batches would move parameters by the learning rate (2e-3).
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """1 process with 4 devices, uninterrupted."""
  workdir = tmp_path_factory.mktemp("one_process") / "run"
  _train(workdir, 1, 4)
  return workdir


def test_two_processes_train_as_one_process_with_their_devices(reference, tmp_path):
  workdir = tmp_path / "run"
  (out0, err0), (out1, _) = [r[1:] for r in _train(workdir, 2, 2)]
  assert "(2 process(es))" in err0 and "4 cpu device(s)" in err0
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["devices"] == 4 and summary["global_batch_size"] == 8
  # The same global batches, so the same losses, gradients and parameters step by step, and
  # the same evaluation (every val example once, counted over both processes).
  _assert_same_rows(_rows(workdir), _rows(reference))
  _assert_same_state(workdir, reference)
  assert summary["miou"] == pytest.approx(json.loads((reference / "summary.json").read_text())
                                          ["miou"], rel=1e-6)
  # Each process saved its own data position; only process 0 reports.
  assert sorted(os.listdir(workdir / "checkpoints" / str(STEPS) / "data")) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  assert '"miou"' in out0 and '"miou"' not in out1


def _preempt(workdir, processes, devices, at=3):
  """Runs until step `at`, sends SIGTERM to process 0 there; returns the processes' results."""
  with _processes(workdir, processes, devices, pause_at=at) as started:
    return helpers.sigterm_when_paused(started, f"{workdir}.paused")


def test_preempted_two_process_run_agrees_on_a_step_and_resumes_on_one_process(reference,
                                                                             tmp_path):
  workdir = tmp_path / "run"
  results = _preempt(workdir, 2, 2, at=2)
  for code, _, err in results:
    assert code == 0, err[-3000:]
  saved = [int(line.split("saved step ")[1].split()[0]) for _, out, _ in results
           for line in out.splitlines() if "preempted" in line]
  # Both processes stop at the step the preemption service chose, after the notice.
  assert len(saved) == 2 and saved[0] == saved[1] and 2 <= saved[0] < STEPS, results
  assert ocp.CheckpointManager(workdir / "checkpoints").latest_step() == saved[0]
  # One process with the same 4 devices carries on from the two processes' data positions.
  # (One process's own SIGTERM path is tested through experiments.sagan, tests/test_gan.py,
  # and, resuming exactly, through the superpixel GNN, tests/test_graph_train.py.)
  _train(workdir, 1, 4)
  _assert_same_rows(_rows(workdir), _rows(reference))
  _assert_same_state(workdir, reference)


@pytest.mark.parametrize("processes,workers", [(1, 0), (2, 0), (2, 2), (4, 3)])
def test_process_shares_of_a_global_batch_are_the_one_process_batch(processes, workers):
  one = pipeline.GlobalBatchSampler(50, 12, seed=1)
  shares = [one.with_layout(p, processes, workers) for p in range(processes)]
  local = 12 // processes
  for batch in range(7):
    expected = [one[batch * 12 + i].record_key for i in range(12)]
    got = []
    for sampler in shares:
      # Grain's reading order: worker w takes indices w, w + W, ... and batches them.
      w, j = batch % max(workers, 1), batch // max(workers, 1)
      got += [sampler[w + max(workers, 1) * (j * local + t)].record_key for t in range(local)]
    assert got == expected


def test_loader_position_carries_over_to_another_process_layout():
  source = SyntheticShapes("train", image_size=16, num_examples=10)
  one = iter(pipeline.train_loader(source, batch_size=4, seed=0, process_index=0,
                                   process_count=1))
  expected = [next(one)["image"] for _ in range(5)]
  for p in range(2):
    loader = pipeline.train_loader(source, batch_size=2, seed=0, process_index=p,
                                   process_count=2)
    it = iter(loader)
    template = json.loads(it.get_state())
    it.set_state(json.dumps(loader.global_sampler.iterator_state(3, template)).encode())
    np.testing.assert_array_equal(next(it)["image"], expected[3][2 * p:2 * p + 2])


@pytest.mark.parametrize("batches_read", [3, 4])
def test_checkpoint_of_two_processes_resumes_its_data_position_on_one(tmp_path, batches_read):
  """A checkpoint at step 3 whose per-process files were written by 2 processes; one process
  resumes it. Had the processes read another number of batches than the step says (skipped
  bad examples do that), the position is refused, not guessed."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  source = SyntheticShapes("train", image_size=16, num_examples=10)
  one = pipeline.train_loader(source, batch_size=4, seed=0)
  expected = list(itertools.islice(iter(one), 4))
  directory = tmp_path / "checkpoints"
  ckpt = Checkpointer(str(directory), {}, async_save=False, sampler=one.global_sampler)
  ckpt.save(3, {"w": jnp.zeros(2)}, iter(one))
  ckpt.close()
  data = directory / "3" / "data"
  (data / "process_0-of-1.json").unlink()
  for p in range(2):
    it = iter(pipeline.train_loader(source, batch_size=2, seed=0, process_index=p,
                                    process_count=2))
    for _ in range(batches_read):
      next(it)
    (data / f"process_{p}-of-2.json").write_bytes(it.get_state())
  ckpt = Checkpointer(str(directory), {}, sampler=one.global_sampler)
  resumed = iter(one)
  if batches_read != 3:
    with pytest.raises(JaxsegError, match=r"written by 2 process\(es\) with --config.data."
                                          r"worker_count=0, this run has 1 and 0, and its data "
                                          r"position \(process 0\) is not the one 3 global "
                                          r"batches give"):
      ckpt.restore(3, {"w": jnp.zeros(2)}, resumed)
    return
  ckpt.restore(3, {"w": jnp.zeros(2)}, resumed)
  np.testing.assert_array_equal(next(resumed)["image"], expected[3]["image"])


@pytest.mark.parametrize("environ,tpu,expected", [
    ({}, False, None),
    ({"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
      "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}, False, "slurm"),
    ({"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1",
      "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, False, None),  # one task: nothing to join
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}, False, None),  # sbatch script, not srun
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "4"}, False,
     "open_mpi"),
    ({}, True, "cloud_tpu"),
])
def test_detects_the_launcher(environ, tpu, expected):
  assert distributed.detect_cluster(environ, tpu_vm=tpu) == expected


@pytest.mark.parametrize("args,message", [
    (("localhost:1234", None, None), r"--coordinator_address also needs --num_processes and "
                                     r"--process_id"),
    ((None, 2, 0), r"--num_processes, --process_id also needs --coordinator_address"),
    (("localhost:1234", 2, 2), r"--process_id=2 must be in \[0, 2\)"),
    (("localhost:1234", 0, 0), r"--num_processes=0 must be at least 1"),
    (("localhost", 2, 0), r"--coordinator_address='localhost' must be HOST:PORT"),
])
def test_process_flags_errors(args, message):
  with pytest.raises(JaxsegError, match=message):
    distributed.check_process_flags(*args)


def test_srun_tasks_join_without_flags():
  # What srun sets for 2 tasks on one node. JAX derives the coordinator port from the job id
  # (61440 + id mod 4096): pick an id whose port is free.
  for port in random.Random().sample(range(61440, 65536), 50):
    with socket.socket() as s, contextlib.suppress(OSError):
      s.bind(("localhost", port))
      break
  script = ("from jaxseg.train import distributed; how = distributed.initialize(); "
            "import jax; print('joined', how, jax.process_index(), jax.process_count(), "
            "jax.device_count())")
  runs = [([sys.executable, "-c", script],
           dict(helpers.device_env(2), SLURM_JOB_ID=str(port - 61440),
                SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2", SLURM_PROCID=str(task),
                SLURM_LOCALID=str(task))) for task in range(2)]
  with helpers.processes_in_sessions(runs) as started:
    results = helpers.finish(started, timeout=300)
  for task, (code, out, err) in enumerate(results):
    assert code == 0, err[-3000:]
    assert f"joined slurm {task} 2 4" in out


def test_process_flags_of_one_process_need_no_runtime():
  assert not distributed.check_process_flags("localhost:1234", 1, 0)
  assert not distributed.check_process_flags(None, None, None)
  assert distributed.check_process_flags("10.0.0.2:8476", 4, 3)


def test_bad_flag_is_one_line_from_the_entry_point(tmp_path):
  result = subprocess.run([sys.executable, "-m", "experiments.unet", f"--workdir={tmp_path}",
                           "--num_processes=2", "--process_id=0"], cwd=ROOT,
                          env=helpers.device_env(1), capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      "error: --num_processes, --process_id also needs --coordinator_address: every process "
      "of a run is started with the same --coordinator_address=HOST:PORT and --num_processes, "
      "and its own --process_id")


def test_a_bucket_url_as_workdir_is_refused_in_one_line():
  from jaxseg.train import segmentation  # pylint: disable=g-import-not-at-top
  with pytest.raises(JaxsegError, match=r"^--workdir=gs://bucket/run: URLs are not supported; "
                                        r"mount the bucket"):
    segmentation.train_and_evaluate(helpers.tiny_config(steps=1), "gs://bucket/run")
  assert not pathlib.Path("gs:").exists()
