"""`python -m tests.train_tiny WORKDIR STEPS [key=value ...]`: the tiny DeepLab run of the tests.

A separate process so that tests can kill it (SIGKILL mid-save) and start it again.
"""

import json
import sys

from jaxseg.train import segmentation
from tests import helpers


def main(argv):
  workdir, steps, overrides = argv[1], int(argv[2]), dict(a.split("=", 1) for a in argv[3:])
  config = helpers.tiny_config(steps=steps)
  for key, value in overrides.items():
    section, name = key.split(".")
    setattr(config[section], name, type(config[section][name])(value))
  summary = segmentation.train_and_evaluate(config, workdir)
  print(json.dumps({k: summary[k] for k in ("steps", "steps_this_run", "resumed_from", "miou")}))


if __name__ == "__main__":
  main(sys.argv)
