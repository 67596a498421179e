"""`python -m tests.train_tiny WORKDIR STEPS [key=value ...]`: the tiny DeepLab run of the tests.

A separate process so that tests can kill it (SIGKILL mid-save) and start it again.
"""

import ast
import json
import os
import signal
import sys

from jaxseg.train import checkpoint, segmentation
from tests import helpers

# Fault injection: SIGKILL this process right after the asynchronous save of this step was
# issued, i.e. while Orbax is still writing it in the background.
KILL_AFTER_SAVE = os.environ.get("TRAIN_TINY_KILL_AFTER_SAVE_STEP")


def _save_then_maybe_die(save):
  def wrapped(self, step, *args, **kwargs):
    saved = save(self, step, *args, **kwargs)
    if saved and str(step) == KILL_AFTER_SAVE:
      os.kill(os.getpid(), signal.SIGKILL)
    return saved
  return wrapped


def main(argv):
  if KILL_AFTER_SAVE:
    checkpoint.Checkpointer.save = _save_then_maybe_die(checkpoint.Checkpointer.save)
  workdir, steps, overrides = argv[1], int(argv[2]), dict(a.split("=", 1) for a in argv[3:])
  config = helpers.tiny_config(steps=steps)
  for key, value in overrides.items():
    section, name = key.split(".")
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # a plain string
    setattr(config[section], name, value)
  summary = segmentation.train_and_evaluate(config, workdir)
  print(json.dumps({k: summary[k] for k in ("steps", "steps_this_run", "resumed_from", "miou")}))


if __name__ == "__main__":
  main(sys.argv)
