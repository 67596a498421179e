"""Measures GAN augmentation: segmentation on real vs real + generated pairs.

    python -m experiments.gan_augment
    python -m experiments.gan_augment --dataset=camvid --data_dir=../shared/data/camvid \
        --config.data.crop_size=64

Writes WORKDIR/{summary.json, generated_pairs.png, per_class_iou.png, gan/, generated/,
real_seedS/, real+generated_seedS/}; running it again resumes whichever stage was unfinished.
"""

import json

from experiments import launch
from experiments.configs import gan_augment as gan_augment_config
from jaxseg.studies import gan_augment

_DATA = launch.DataFlags("runs/gan_augment_DATASET")
_CONFIG = launch.define_config("config", gan_augment_config.get_config(),
                               "Config overrides, e.g. --config.augment.num_pairs=400.")


def main():
  config = _CONFIG.value
  _DATA.apply(config)
  workdir = _DATA.workdir.value or f"runs/gan_augment_{config.data.name}"
  summary = gan_augment.run(config, workdir)
  real, both = summary["arms"]["real"]["miou"], summary["arms"]["real+generated"]["miou"]
  print(json.dumps({"miou_real": real["mean"], "miou_real+generated": both["mean"],
                    "miou_difference": summary["miou_difference"]["mean"],
                    "seeds": summary["seeds"], "fid": summary["gan"]["fid"]}))
  print(f"FID features: {summary['gan']['fid_features']}")
  print(f"wrote {workdir}/summary.json, generated_pairs.png, per_class_iou.png, gan/, "
        "generated/, and one run directory per arm and seed")


if __name__ == "__main__":
  launch.run(main)
