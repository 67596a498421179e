"""Segments images by classifying their SLIC superpixels with a jraph graph network.

    python -m experiments.superpixel_gnn --dataset=camvid --data_dir=../shared/data/camvid
    python -m experiments.superpixel_gnn --config.hybrid.cnn_workdir=runs/deeplab_resnet101_synthetic

Writes WORKDIR/{summary.json (pixel metrics and the superpixel oracle), predictions.png (with
superpixel boundaries), metrics.jsonl, graphs/ (the cached region graphs), checkpoints/};
running it again resumes from WORKDIR.
"""

from experiments import launch
from experiments.configs import superpixel_gnn as gnn_config
from jaxseg.runs import load_run
from jaxseg.train import graph

_DATA = launch.DataFlags("runs/superpixel_gnn_DATASET")
_CONFIG = launch.define_config("config", gnn_config.get_config(),
                               "Config overrides, e.g. --config.model.layer=gat.")


def main():
  config = _CONFIG.value
  _DATA.apply(config)
  workdir = _DATA.workdir.value or f"runs/superpixel_gnn_{config.data.name}"
  cnn = (load_run(config.hybrid.cnn_workdir, "config.hybrid.cnn_workdir")
         if config.hybrid.cnn_workdir else None)
  summary = graph.train_and_evaluate(config, workdir, cnn=cnn)
  launch.report(summary, workdir)
  print(f"superpixel oracle mIoU {summary['oracle_miou']:.3f} (the bound for any superpixel "
        f"labelling), model {summary['miou']:.3f}")


if __name__ == "__main__":
  launch.run(main)
