"""`python -m tests.run_paused MODULE [FLAGS...]`: runs an experiment entry point (e.g.
experiments.unet) that pauses at step $PAUSE_AT_STEP, so that a test can send it SIGTERM there.

On reaching that step the process writes $PAUSE_FILE and waits: a single process until its
SIGTERM handler has seen the signal (it then stops right there), each process of a
multi-process run for a few seconds, while JAX's preemption service spreads the notice (they
then agree on the next step).
"""

import os
import pathlib
import runpy
import sys
import time

import jax

from jaxseg.train import distributed

PAUSE_AT_STEP = int(os.environ["PAUSE_AT_STEP"])
PAUSE_FILE = pathlib.Path(os.environ["PAUSE_FILE"])


def _pausing(reached):
  def wrapped(self, step):
    if step == PAUSE_AT_STEP:
      if jax.process_index() == 0:
        PAUSE_FILE.write_text(str(os.getpid()))
      deadline = time.monotonic() + (60 if jax.process_count() == 1 else 5)
      while time.monotonic() < deadline and not self._requested.is_set():  # pylint: disable=protected-access
        time.sleep(0.05)
    return reached(self, step)
  return wrapped


if __name__ == "__main__":
  distributed.Preemption.reached = _pausing(distributed.Preemption.reached)
  module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
  runpy.run_module(module, run_name="__main__", alter_sys=True)
