"""Trains SAGAN or the mask-to-image GAN and scores it with FID/KID.

    python -m experiments.sagan
    python -m experiments.sagan --config.model.kind=mask --dataset=camvid \
        --data_dir=../shared/data/camvid --config.data.crop_size=64

Writes WORKDIR/{samples.png, samples/step_N.png, summary.json (FID, KID and the feature
network they used), metrics.jsonl, checkpoints/}; running it again resumes from WORKDIR.
"""

import json

from experiments import launch
from experiments.configs import sagan as sagan_config
from jaxseg.train import gan_loop

_DATA = launch.DataFlags("runs/gan_KIND_DATASET")
_CONFIG = launch.define_config("config", sagan_config.get_config(),
                               "Config overrides, e.g. --config.model.kind=mask.")


def main():
  config = _CONFIG.value
  _DATA.apply(config)
  workdir = _DATA.workdir.value or f"runs/gan_{config.model.kind}_{config.data.name}"
  summary = gan_loop.train_and_evaluate(config, workdir)
  print(json.dumps({k: summary[k] for k in ("fid", "kid", "steps", "train_seconds")}))
  print(f"FID/KID features: {summary['fid_features']}")
  print(f"wrote {workdir}/summary.json, samples.png, samples/, metrics.jsonl, checkpoints/")


if __name__ == "__main__":
  launch.run(main)
