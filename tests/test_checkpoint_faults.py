"""Checkpoint faults: a damaged newest checkpoint is passed over for the newest intact one, and
a save the file system refuses is one line that leaves no temporary directory.

A 2-layer Dense train state and a grain iterator are saved at steps 1-3; each test takes a
second or two. Full and read-only disks are real (a 1 MB tmpfs, where this machine lets
root mount one; skipped elsewhere); the portable fault is a file size limit (RLIMIT_FSIZE),
which makes the background write of the state fail with EFBIG on any machine.
"""

import contextlib
import errno
import itertools
import logging
import os
import resource
import signal
import subprocess
import time

import flax.linen as nn
import grain.python as grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxseg.errors import JaxsegError
from jaxseg.train.checkpoint import Checkpointer, DamagedCheckpoint, restore_latest_state, resume
from jaxseg.train.state import TrainState
from tests import helpers

IDENTITY = {"model": "tiny", "num_classes": 2}


class _Tiny(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(2)(nn.relu(nn.Dense(4)(x)))


def _state():
  params = _Tiny().init(jax.random.key(0), jnp.zeros((1, 3)))["params"]
  return TrainState.create(apply_fn=_Tiny().apply, params=params, tx=optax.sgd(0.1),
                           batch_stats={}, rng=jax.random.key(1))


def _at(state, step):
  """The state of step `step`: every parameter moved by `step`, so steps differ everywhere."""
  return state.replace(step=jnp.asarray(step, jnp.int32),
                       params=jax.tree.map(lambda x: x + step, state.params))


def _loader():
  return grain.DataLoader(
      data_source=grain.RangeDataSource(0, 64, 1), worker_count=0,
      sampler=grain.IndexSampler(64, shard_options=grain.NoSharding(), shuffle=True, seed=3,
                                 num_epochs=1),
      operations=[grain.Batch(2)])


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def saved(tmp_path):
  """(directory, initial state, the loader's batches): steps 1-3 saved, step s after s batches."""
  directory = tmp_path / "checkpoints"
  state, it = _state(), iter(_loader())
  ckpt = Checkpointer(str(directory), IDENTITY, keep=3)
  for step in (1, 2, 3):
    next(it)
    ckpt.save(step, _at(state, step), it, progress={"seconds": step})
    ckpt.wait()
  ckpt.close()
  return directory, state, list(itertools.islice(iter(_loader()), 5))


def _files(step_dir, pattern):
  found = sorted(p for p in step_dir.glob(pattern) if p.is_file())
  assert found, f"no {pattern} in {step_dir}: {sorted(step_dir.rglob('*'))}"
  return found


def _delete(step_dir, pattern):
  for p in _files(step_dir, pattern):
    p.unlink()


def _truncate(step_dir, pattern):
  for p in _files(step_dir, pattern):
    p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])


def _garbage(step_dir, pattern):
  for p in _files(step_dir, pattern):
    p.write_bytes(b"\x00\xffnot a checkpoint" * (p.stat().st_size // 17 + 1))


# (what is damaged, how, the part the warning names). state/d holds the arrays' OCDBT data,
# state/_METADATA the tree's metadata; identity, progress and data are JSON.
DAMAGE = [
    ("state/d/*", _delete, "state"),
    ("state/d/*", _truncate, "state"),
    ("state/d/*", _garbage, "state"),
    ("state/_METADATA", _garbage, "state"),
    ("identity/*metadata", _garbage, "identity"),
    ("identity/*metadata", _truncate, "identity"),
    ("progress/*metadata", _delete, "progress"),
    ("data/process_0-of-1.json", _garbage, "data"),  # found while reading the layout
    ("data/process_0-of-1.json", _delete, "data"),  # found by grain, the iterator put back
]


def _no_tracebacks(caplog, capfd):
  assert not [r.getMessage() for r in caplog.records if r.exc_info]
  assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("pattern,damage,part", DAMAGE,
                         ids=[f"{p.split('/')[0]}-{f.__name__[1:]}" + ("-metadata" * ("_M" in p))
                              for p, f, _ in DAMAGE])
def test_damaged_newest_checkpoint_resumes_from_the_one_before(saved, pattern, damage, part,
                                                               caplog, capfd):
  directory, state, batches = saved
  damage(directory / "3", pattern)
  ckpt = Checkpointer(str(directory), IDENTITY, keep=3)
  it = iter(_loader())
  with caplog.at_level(logging.WARNING):
    restored, progress, start = resume(ckpt, state, it)
  assert start == 2 and progress == {"seconds": 2}
  _assert_same(restored, _at(state, 2))
  np.testing.assert_array_equal(next(it), batches[2])  # the data position of step 2, not 3
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
              and "damaged" in r.getMessage()]
  assert len(warnings) == 1, warnings
  assert warnings[0].startswith(f"checkpoint 3 in {directory} is damaged ({part}: ")
  assert f"resuming from step 2, the newest intact one; moved aside to {directory}/3.damaged" \
      in warnings[0]
  assert "\n" not in warnings[0] and "settings" not in warnings[0]
  _no_tracebacks(caplog, capfd)

  # The damaged step is set aside, so Orbax saves step 3 again instead of skipping it as not
  # newer than its latest.
  assert ckpt.save(3, _at(state, 30), it)
  ckpt.close()
  assert sorted(os.listdir(directory)) == ["1", "2", "3", "3.damaged"]
  again = Checkpointer(str(directory), IDENTITY)
  restored, _, start = resume(again, state, iter(_loader()))
  again.close()
  assert start == 30
  _assert_same(restored.params, _at(state, 30).params)


def test_no_intact_checkpoint_is_one_line_and_touches_nothing(saved):
  directory, state, _ = saved
  for step in (1, 2, 3):
    _garbage(directory / str(step), "state/d/*")
  _delete(directory / "2", "identity/*metadata")
  ckpt = Checkpointer(str(directory), IDENTITY)
  with pytest.raises(JaxsegError) as raised:
    resume(ckpt, state, iter(_loader()))
  message = str(raised.value)
  assert "\n" not in message
  assert message.startswith(f"every checkpoint in {directory} is damaged (step 3: state: ")
  assert "; step 2: identity: " in message and "; step 1: state: " in message
  assert message.endswith(f"); move {directory} away to start the run over")
  assert sorted(os.listdir(directory)) == ["1", "2", "3"]


def test_another_runs_checkpoint_is_refused_not_passed_over(saved):
  """The identity is checked first: a readable one that does not match refuses the run (an
  older checkpoint would have the same identity), even when the state is damaged too."""
  directory, state, _ = saved
  _garbage(directory / "3", "state/d/*")
  ckpt = Checkpointer(str(directory), {**IDENTITY, "model": "other"})
  with pytest.raises(JaxsegError, match=r"holds a checkpoint of tiny/None with 2 classes "
                                        r"\(step 3\), but this run builds other/None"):
    resume(ckpt, state, iter(_loader()))
  assert sorted(os.listdir(directory)) == ["1", "2", "3"]


@pytest.mark.parametrize("from_identity", [False, True], ids=["state", "built-from-identity"])
def test_restore_latest_state_passes_over_a_damaged_checkpoint(saved, from_identity, caplog):
  directory, state, _ = saved
  _truncate(directory / "3", "state/d/*")
  ckpt = Checkpointer(str(directory), IDENTITY, async_save=False)

  def build(identity):  # what load_run does: the model's classes come from the checkpoint
    assert identity["num_classes"] == 2
    return state

  with caplog.at_level(logging.WARNING):
    restored, step = restore_latest_state(ckpt, build if from_identity else state)
  ckpt.close()
  assert step == 2
  _assert_same(restored, _at(state, 2))
  assert [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()][0].startswith(
      f"checkpoint 3 in {directory} is damaged (state: ")
  assert sorted(os.listdir(directory)) == ["1", "2", "3"]  # inference changes nothing
  with pytest.raises(DamagedCheckpoint, match=r"^checkpoint 3 in \S+ is damaged \(state: "):
    Checkpointer(str(directory), IDENTITY).restore_state(3, state)


# --- failed saves -----------------------------------------------------------------------------

def _big(step):
  """A state whose array file (256 KB, incompressible) does not fit where the faults leave room
  for the small files (a 64 KB file size limit, 128 KB left on the disk)."""
  return {"w": jax.random.normal(jax.random.key(step), (65536,)), "step": jnp.int32(step)}


@contextlib.contextmanager
def _file_size_limit(size):
  """RLIMIT_FSIZE for this process: writes past `size` bytes fail with EFBIG (SIGXFSZ, which
  would kill the process, is ignored). Needs no privileges."""
  old = resource.getrlimit(resource.RLIMIT_FSIZE)
  handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (size, old[1]))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, old)
    signal.signal(signal.SIGXFSZ, handler)


@pytest.fixture
def small_disk(tmp_path):
  """A 1 MB tmpfs."""
  with helpers.tmpfs(tmp_path / "disk", "1m") as mount_point:
    yield mount_point


@contextlib.contextmanager
def _full(mount_point):
  """Fills the disk but for 128 KB: the probe and the small files fit, the state does not."""
  stat = os.statvfs(mount_point)
  (mount_point / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - (128 << 10)))
  yield


@contextlib.contextmanager
def _read_only(mount_point):
  subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True)
  yield


def _fail_the_third_save(directory, fault, surface):
  """Saves steps 1 and 2, then step 3 under `fault`; returns (checkpointer, the error) where
  the failure surfaces at `surface`: the save itself or `wait`, the next save, or `check`."""
  ckpt = Checkpointer(str(directory), IDENTITY, keep=3)
  for step in (1, 2):
    ckpt.save(step, _big(step))
    ckpt.wait()
  with fault, pytest.raises(JaxsegError) as raised:
    ckpt.save(3, _big(3))
    if surface == "wait":
      ckpt.wait()
    elif surface == "next save":
      ckpt.save(4, _big(4))
    else:
      for _ in range(600):  # a step boundary: raises once the background write has failed
        ckpt.check()
        time.sleep(0.05)
  return ckpt, raised.value


def _assert_clean_failure(ckpt, directory, error, head, advice, caplog, capfd):
  message = str(error)
  assert "\n" not in message
  assert message == f"{head}; the last good checkpoint is 2 ({advice} to resume from it)"
  assert ckpt.last_good_step() == 2
  ckpt.close()  # what the training loop's `finally` does: nothing more is raised or printed
  ckpt.wait()
  assert not [p for p in directory.rglob("*") if "tmp" in p.name]
  assert sorted(os.listdir(directory)) == ["1", "2"]
  _no_tracebacks(caplog, capfd)
  again = Checkpointer(str(directory), IDENTITY)
  assert again.latest_step() == 2
  _assert_same(again.restore_state(2, _big(0)), _big(2))
  again.close()


@pytest.mark.parametrize("surface", ["wait", "next save", "check"])
def test_file_size_limit_fails_the_save_in_one_line(tmp_path, surface, caplog, capfd):
  directory = tmp_path / "checkpoints"
  ckpt, error = _fail_the_third_save(directory, _file_size_limit(64 << 10), surface)
  _assert_clean_failure(ckpt, directory, error,
                        f"could not write checkpoint 3 to {directory}: File too large",
                        "fix that and run again", caplog, capfd)


def test_full_disk_fails_the_save_in_one_line(small_disk, caplog, capfd):
  directory = small_disk / "checkpoints"
  ckpt, error = _fail_the_third_save(directory, _full(small_disk), "wait")
  (small_disk / "filler").unlink()
  _assert_clean_failure(ckpt, directory, error,
                        f"no space left on {directory}: checkpoint 3 not written",
                        "free space and run again", caplog, capfd)


def test_read_only_disk_fails_the_save_in_one_line(small_disk, caplog, capfd):
  """Found before Orbax starts (a probe file): its threads would wait 5 minutes for a step
  directory it could not make."""
  directory = small_disk / "checkpoints"
  start = time.monotonic()
  ckpt, error = _fail_the_third_save(directory, _read_only(small_disk), "wait")
  assert time.monotonic() - start < 60
  assert str(error) == (f"read-only file system at {directory}: checkpoint 3 not written; the "
                        f"last good checkpoint is 2 (make it writable and run again to resume "
                        f"from it)")
  ckpt.close()
  assert sorted(os.listdir(directory)) == ["1", "2"]
  _no_tracebacks(caplog, capfd)


@pytest.mark.parametrize("code,head,advice", [
    (errno.EACCES, "permission denied on {}: checkpoint 1 not written",
     "make it writable and run again"),
    (errno.EDQUOT, "disk quota exceeded on {}: checkpoint 1 not written",
     "free space and run again"),
    (errno.EIO, "could not write checkpoint 1 to {}: Input/output error", "fix that and run again"),
], ids=["EACCES", "EDQUOT", "EIO"])
@pytest.mark.parametrize("raised_by", ["file system", "tensorstore"])
def test_write_fault_messages(tmp_path, monkeypatch, code, head, advice, raised_by):
  """Every errno reads as what it is; tensorstore reports it in its message only. With no
  checkpoint before, there is nothing to resume from."""
  ckpt = Checkpointer(str(tmp_path), IDENTITY)
  if raised_by == "file system":
    error = OSError(code, os.strerror(code), str(tmp_path / "1.orbax-checkpoint-tmp"))
  else:
    error = ValueError(f'RESOURCE_EXHAUSTED: Error writing "w/0": Failed to write 16 bytes: '
                       f"{os.strerror(code)} [os_error_code='{code}']")

  def fail(*args, **kwargs):
    raise error

  monkeypatch.setattr(ckpt.manager, "save", fail)
  (tmp_path / "1.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
  with pytest.raises(JaxsegError) as raised:
    ckpt.save(1, _big(1))
  assert str(raised.value) == (f"{head.format(tmp_path)}; the last good checkpoint is none "
                               f"({advice})")
  assert not (tmp_path / "1.orbax-checkpoint-tmp").exists()
  ckpt.close()
