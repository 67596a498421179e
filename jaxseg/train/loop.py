"""The training skeleton every task shares: `Run` (segmentation, superpixel GNN, GAN).

A task builds its state, step and batches (jaxseg.train.build), then

    with loop.Run(workdir, config, settings, purpose="segmentation training") as run:
      state = run.resume(state, identity, data_iterator=it, sampler=sampler)
      state = run.train(state, train_step, next_batch, evaluate=evaluate)
      run.write_summary(state, {...the task's own figures...})

and `Run` does the rest, the same way for every task:

- the workdir: created, proven writable and locked before anything compiles (the lock names
  the holder's PID and host to a second run);
- resume: a changed setting that would make the resumed run another run (optimizer, loss,
  seed, data, model) is refused in one line naming the key; harmless changes (more steps,
  another cadence or worker count) are accepted and recorded in config.json's `changes`;
- one cadence, in this order at every step: (1) the step runs; (2) the previous step's
  outputs are read back (one step behind, so the host never stalls the device) and logged,
  and the non-finite policy applied; (3) the preemption check (SIGTERM, Ctrl-C); (4) sample
  pictures (`sample_every`); (5) evaluation (`eval_every` and the last step; skipped when
  stopping); (6) the checkpoint (`checkpoint_every`, the last step, or stopping); (7) stop.
  Evaluation comes before the checkpoint, so a step whose checkpoint exists has its row in
  metrics.jsonl; a run stopped between the two re-evaluates that step when resumed;
- one non-finite policy: the step itself keeps parameters, optimizer state, BatchNorm
  statistics and RNG when its loss, gradients or update are not finite (it only advances
  the counters); the loop logs each such step and stops after `max_nonfinite_steps` in a row;
- the weight average (train.ema_decay, jaxseg.train.ema): each evaluation scores the raw and
  the averaged weights ("eval/<key>" and "eval/ema/<key>"), and summary.json has both;
- the best checkpoint (train.keep_best): every evaluated step is saved with its scores, and
  the one with the best score is kept beside the last `keep_checkpoints`
  (summary.json's `best_step`, `best_metric`, `best_value`);
- one definition of the timing figures (`Chrono`) and one writer of summary.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
from absl import logging

from jaxseg.errors import JaxsegError
from jaxseg.train import distributed, xla_stats
from jaxseg.train import ema as ema_lib
from jaxseg.train.build import LoopSettings
from jaxseg.train.checkpoint import Checkpointer, DamagedCheckpoint, resume
from jaxseg.train.logging import MetricWriter, Progress
from jaxseg.train.workdir import Lock, ensure_writable, write_json

# Settings that may differ when a run is resumed: they change what happens from now on, not
# what the checkpoint is (recorded in config.json's "changes"). Any other change is refused.
RESUMABLE_CHANGES = (
    "train.steps", "train.eval_every", "train.log_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.num_eval_examples", "train.num_prediction_images",
    "train.eval_batch_size", "train.sample_every", "train.num_samples",
    "train.max_nonfinite_steps", "train.keep_best", "data.worker_count", "data.prefetch",
    "data.skip_bad_examples", "data.data_dir", "model.pretrained", "eval.")
CHANGES_KEY = "changes"


@dataclasses.dataclass
class Evaluation:
  """What a task's `evaluate(state, step)` returns: scalars for metrics.jsonl (keys start
  with "eval/") and anything the task wants back for its summary (`result`).

  For a state with a weight average the loop evaluates both weights and merges them: the
  average's scalars as "eval/ema/<key>" and its result as `ema`."""
  scalars: dict[str, float]
  result: Any = None
  ema: Any = None


class Chrono:
  """The run's timing figures, defined once for every task (big_vision's `u.chrono` idea):

  - compile_seconds: this run's first step, from the call to its outputs (XLA compiles it);
  - train_seconds: the loop's wall time without the first step of each run and without
    evaluation and sample pictures, summed over every run that built the checkpoint;
  - eval_seconds: evaluation and sample pictures (and a GAN's final scores), summed likewise;
  - images_per_second: global batch x the steps timed in train_seconds / train_seconds.
  """

  def __init__(self, earlier: dict[str, Any], batch_size: int):
    self.batch_size = batch_size
    self.earlier_train = float(earlier.get("train_seconds", 0.0))
    self.earlier_steps = int(earlier.get("timed_steps", 0))
    self.earlier_eval = float(earlier.get("eval_seconds", 0.0))
    self.compile_seconds: float | None = None
    self.step_stats = {k: earlier.get(k) for k in ("train_step_flops", "train_step_peak_bytes")}
    self._eval = 0.0  # evaluation in this run
    self._eval_in_train = 0.0  # ... of which while the timed steps ran
    self._t0 = self._t_end = self._first_call = None
    self._steps = 0

  def first_step_called(self) -> None:
    self._first_call = time.perf_counter()

  def step_done(self) -> None:
    """A step's outputs are on the host."""
    if self.compile_seconds is None:
      now = time.perf_counter()
      self.compile_seconds = now - (self._first_call or now)
      self._t0 = now
    else:
      self._steps += 1

  def loop_done(self) -> None:
    self._t_end = time.perf_counter()

  @contextlib.contextmanager
  def pause(self):
    """Time spent inside is evaluation, not training."""
    t = time.perf_counter()
    try:
      yield
    finally:
      spent = time.perf_counter() - t
      self._eval += spent
      if self._t0 is not None and self._t_end is None:
        self._eval_in_train += spent

  def set_step_stats(self, stats: dict[str, Any]) -> None:
    self.step_stats = {"train_step_flops": stats["flops"],
                       "train_step_peak_bytes": stats["peak_bytes"]}

  def figures(self) -> dict[str, Any]:
    """The cumulative figures (what checkpoints carry and summary.json reports)."""
    this_run = 0.0
    if self._t0 is not None:
      this_run = max((self._t_end or time.perf_counter()) - self._t0 - self._eval_in_train, 0.0)
    train = self.earlier_train + this_run
    steps = self.earlier_steps + self._steps
    return {"train_seconds": train, "timed_steps": steps,
            "eval_seconds": self.earlier_eval + self._eval,
            "images_per_second": steps * self.batch_size / train if steps and train else None,
            **self.step_stats}


def _flat(tree, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
  return out


def config_changes(saved: dict, config: dict) -> dict[str, tuple[Any, Any]]:
  """{key: (saved value, new value)} of every flattened config key that differs."""
  old, new = _flat({k: v for k, v in saved.items() if k != CHANGES_KEY}), _flat(config)
  return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k)}


class Run:
  """One training run in its workdir (see the module docstring); use as a context manager."""

  def __init__(self, workdir: str, config, settings: LoopSettings, *,
               purpose: str = "training run"):
    self.workdir = ensure_writable(workdir)
    self.config, self.settings = config, settings
    self.lock = Lock(self.workdir, purpose).acquire()
    self.ckpt: Checkpointer | None = None
    self.writer: MetricWriter | None = None
    self.start, self.earlier = 0, {}
    self.chrono = Chrono({}, settings.batch_size)
    self.final: Evaluation | None = None
    self.final_step: int | None = None

  def path(self, *names: str) -> str:
    return os.path.join(self.workdir, *names)

  # --- resume ------------------------------------------------------------------------------

  def _check_config(self, step: int) -> list[dict[str, Any]]:
    """The recorded changes of config.json plus this resume's; one line for a refused one."""
    path = self.path("config.json")
    if not os.path.exists(path):
      return []
    with open(path) as f:
      saved = json.load(f)
    changes = config_changes(saved, self.config.to_dict())
    for key, (old, new) in changes.items():
      if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_CHANGES):
        raise JaxsegError(
            f"--config.{key}={new!r}: {self.workdir} (step {step}) was trained with {old!r}; "
            f"resume with the same value, or use another --workdir (it was left untouched)")
    recorded = list(saved.get(CHANGES_KEY, []))
    if changes:
      recorded.append({"step": step, **{k: [o, n] for k, (o, n) in changes.items()}})
      logging.info("Resuming at step %d with changed settings: %s", step,
                   ", ".join(f"{k} {o!r} -> {n!r}" for k, (o, n) in changes.items()))
    return recorded

  def resume(self, state, identity: dict[str, Any], *, data_iterator=None, sampler=None):
    """The state of the workdir's newest intact checkpoint (with the data iterator moved to
    its position), or `state` when there is none; then writes config.json."""
    best = self.settings.keep_best
    self.ckpt = Checkpointer(self.path("checkpoints"), identity,
                             keep=self.settings.keep_checkpoints, sampler=sampler,
                             best=f"eval/{best}" if best else "")
    latest = self.ckpt.latest_step()
    changes = []
    if latest is not None:
      # The checkpoint's own identity check first (its messages say more: another model,
      # other parameter shapes), then the settings, both before anything is restored: a
      # changed seed or data order must be refused, not taken for a damaged checkpoint.
      with contextlib.suppress(DamagedCheckpoint):  # resume() passes over a damaged one
        self.ckpt.check_identity(latest)
      changes = self._check_config(latest)
    state, self.earlier, self.start = resume(self.ckpt, state, data_iterator)
    # Only once the checkpoint (if any) is known to be this run's: a refused run leaves the
    # config its checkpoint belongs to.
    config = self.config.to_dict()
    if changes:
      config[CHANGES_KEY] = changes
    write_json(self.path("config.json"), config)
    self.writer = MetricWriter(self.workdir, resume_step=self.start)
    self.chrono = Chrono(self.earlier, self.settings.batch_size)
    return state

  # --- the loop ----------------------------------------------------------------------------

  def is_eval_step(self, step: int) -> bool:
    every = self.settings.eval_every
    return step == self.settings.steps or bool(every and step % every == 0)

  def _evaluate(self, evaluate, state, step: int, held: dict | None = None) -> Evaluation:
    with self.chrono.pause():
      evaluation = evaluate(state, step)
      if ema_lib.has_average(state):
        averaged = evaluate(ema_lib.averaged(state), step)
        evaluation = Evaluation(
            {**evaluation.scalars,
             **{f"eval/ema/{k.removeprefix('eval/')}": v for k, v in averaged.scalars.items()}},
            evaluation.result, averaged.result)
    self.writer.write(step, {**(held or {}), **evaluation.scalars})
    return evaluation

  def train(self, state, train_step: Callable, next_batch: Callable[[int], Any], *,
            evaluate: Callable[[Any, int], Evaluation] | None = None,
            samples: Callable[[Any, int], None] | None = None, data_iterator=None,
            loss_key: str = "loss"):
    """Runs steps start+1..steps in the documented order; returns the final state.

    `train_step(state, batch) -> (state, outputs)` is jitted with shardings; its outputs hold
    `finite` and `nonfinite_streak` (the non-finite policy) and scalars to log.
    `next_batch(step)` gives the step's global batch. `evaluate(state, step)` scores the
    model; the final step is always evaluated (also when a finished run is run again).
    """
    s = self.settings
    progress = Progress(s.steps, self.start, s.batch_size)
    held: dict[int, dict] = {}  # train rows of eval steps, written with the evaluation

    def drain(step, out):
      out = jax.device_get(out)
      self.chrono.step_done()
      finite = bool(out.pop("finite", True))
      streak = int(out.pop("nonfinite_streak", 0))
      if not finite:
        progress.write(f"step {step}: non-finite loss, gradient or update "
                       f"({float(out[loss_key])}); update skipped ({streak} in a row)")
        self.writer.write(step, {**out, "nonfinite_step": 1})
        if streak >= s.max_nonfinite_steps:
          raise FloatingPointError(
              f"training stopped at step {step}: {streak} consecutive steps with a non-finite "
              f"loss, gradient or update (limit train.max_nonfinite_steps="
              f"{s.max_nonfinite_steps}); lower the learning rate or check the data")
      elif evaluate is not None and self.is_eval_step(step):
        held[step] = out
      elif step % s.log_every == 0 or step == s.steps:
        self.writer.write(step, out)
      lr = out.get("learning_rate")
      progress.update(step, float(out[loss_key]), None if lr is None else float(lr))

    if (evaluate is not None and 0 < self.start < s.steps and self.is_eval_step(self.start)
        and not any(k.startswith("eval/") for k in self.writer.logged(self.start))):
      # Stopped after this step's checkpoint but before its evaluation row was written.
      progress.write(f"step {self.start}: evaluating again (its row was not written)")
      self._evaluate(evaluate, state, self.start)

    pending, compiled = None, None
    with distributed.Preemption() as preemption:
      try:
        for step in range(self.start + 1, s.steps + 1):
          batch = next_batch(step)
          if compiled is None:  # compiled here once, for its FLOPs and memory as well
            self.chrono.first_step_called()
            compiled, stats = xla_stats.compile_with_stats(train_step, state, batch)
            self.chrono.set_step_stats(stats)
          state, out = compiled(state, batch)
          self.ckpt.check()  # a failed background save stops the run at the next step
          if pending is not None:
            drain(*pending)
          pending = (step, out)
          stop = preemption.reached(step)
          sample_now = bool(samples and ((s.sample_every and step % s.sample_every == 0)
                                         or step == s.steps) and not stop)
          eval_now = evaluate is not None and self.is_eval_step(step) and not stop
          # With keep_best every evaluated step is a candidate, so it is saved with its scores.
          save_now = (step % s.checkpoint_every == 0 or step == s.steps or stop
                      or (eval_now and bool(s.keep_best)))
          evaluation = None
          if step == self.start + 1 or sample_now or eval_now or save_now:
            drain(*pending)
            pending = None
          if sample_now:
            with self.chrono.pause():
              samples(state, step)
          if eval_now:
            evaluation = self._evaluate(evaluate, state, step, held.pop(step, None))
            if step == s.steps:
              self.final = evaluation
            else:
              miou = evaluation.scalars.get("eval/miou")
              if miou is not None:
                progress.write(f"step {step}: val mIoU {miou:.4f}")
          if save_now:
            self.ckpt.save(step, state, data_iterator,
                           force=step == s.steps or stop or evaluation is not None,
                           progress=self.chrono.figures(),
                           metrics=evaluation.scalars if evaluation is not None else None)
          if stop:
            if step in held:  # its evaluation is skipped: stop as soon as possible
              self.writer.write(step, held.pop(step))
            progress.close()
            raise distributed.Preempted(step, self.workdir, preemption.signum)
        if pending is not None:
          drain(*pending)
        self.chrono.loop_done()
      finally:
        progress.close()
        self.ckpt.wait()
    self.final_step = int(jax.device_get(state.step))
    if evaluate is not None and self.final is None:  # a finished run, run again
      self.final = self._evaluate(evaluate, state, self.final_step)
    return state

  # --- outputs -----------------------------------------------------------------------------

  def write_summary(self, state, fields: dict[str, Any], mesh=None) -> dict[str, Any]:
    """summary.json: the task's `fields` after the figures every run reports."""
    figures = self.chrono.figures()
    final_step = self.final_step if self.final_step is not None else int(
        jax.device_get(state.step))
    ips = figures["images_per_second"]
    result = {
        **fields,
        "steps": final_step, "steps_this_run": max(final_step - self.start, 0),
        "resumed_from": self.start,
        "train_seconds": round(figures["train_seconds"], 2),
        "compile_seconds": round(self.chrono.compile_seconds or 0.0, 2),
        "eval_seconds": round(figures["eval_seconds"], 2),
        "images_per_second": None if ips is None else round(ips, 3),
        "train_step_flops": figures["train_step_flops"],
        "train_step_peak_bytes": figures["train_step_peak_bytes"],
        "nonfinite_steps": int(jax.device_get(state.nonfinite_total)),
        "devices": jax.device_count() if mesh is None else mesh.devices.size,
        "platform": jax.default_backend(),
        "global_batch_size": self.settings.batch_size,
    }
    if self.final is not None and self.final.ema is not None:
      result["weights"] = "ema"  # what load_run, evaluate and predict use by default
      result.update({f"ema/{k.removeprefix('eval/ema/')}": v
                     for k, v in self.final.scalars.items() if k.startswith("eval/ema/")})
    if self.settings.keep_best:
      self.ckpt.wait()
      best = self.ckpt.best_step()
      result.update({"best_metric": self.settings.keep_best, "best_step": best,
                     "best_value": None if best is None else
                     self.ckpt.metrics(best).get(f"eval/{self.settings.keep_best}")})
    write_json(self.path("summary.json"), result)
    return result

  def close(self) -> None:
    try:
      if self.ckpt is not None:
        self.ckpt.wait()
    finally:
      if self.ckpt is not None:
        self.ckpt.close()
      if self.writer is not None:
        self.writer.close()
      self.lock.release()

  def __enter__(self) -> "Run":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
      return
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass  # the first error is the one to report

