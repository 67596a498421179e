"""python -m experiments.superpixel_gnn --dataset=camvid --data_dir=../shared/data/camvid

Segmentation by superpixel classification: SLIC superpixels become the nodes of a region
adjacency graph and a jraph network labels them (jaxseg.models.superpixel_gnn). More:

    python -m experiments.superpixel_gnn                       # the synthetic shapes
    python -m experiments.superpixel_gnn --config.model.layer=gat
    python -m experiments.superpixel_gnn --dataset=camvid --data_dir=../shared/data/camvid \
        --config.hybrid.cnn_workdir=runs/deeplab_resnet50_camvid   # hybrid: CNN + GNN

The superpixel settings left unset take the dataset's defaults
(jaxseg.train.build.SUPERPIXEL_DEFAULTS).
"""

import ml_collections

from experiments.configs import common


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Graphs are built from whole images once (and cached): no crops, scales or colour jitter,
  # and no image loader.
  config.data = common.data_section(image_pipeline=False)
  # Graphs are built for every train example up front: the first 2000 by default (the
  # synthetic split is procedural, 100,000 images). Val: train.num_eval_examples (0: all).
  config.data.num_train_examples = 2000
  # No train.loss: the loss is the pixel-weighted node cross-entropy.
  config.train = common.train_section(val_metrics=True, steps=1500, checkpoint_every=500,
                                      log_every=50)
  # No backbone: no backbone learning rate or frozen start.
  config.optim = common.optim_section(backbone=False, learning_rate=3e-3, warmup_steps=50)

  config.superpixels = ml_collections.ConfigDict()
  config.superpixels.method = "jax"  # jaxseg.ops.slic on the default device, or "skimage"
  config.superpixels.n_segments = common.placeholder(int)  # about this many per image
  config.superpixels.compactness = 10.0  # colour vs space (skimage's meaning)
  config.superpixels.sigma = 1.0  # Gaussian blur before SLIC
  config.superpixels.scale = common.placeholder(float)  # run SLIC on images scaled by this
  config.superpixels.batch_size = 8  # images per SLIC call while building the graphs

  config.model = ml_collections.ConfigDict()
  config.model.name = "superpixel_gnn"
  config.model.layer = "graph_network"  # or "gat", "gcn"
  config.model.hidden = 128
  config.model.num_layers = 4
  config.model.dropout_rate = 0.1
  config.model.dtype = "auto"  # bfloat16 on GPU/TPU, float32 on CPU

  # Hybrid mode: the class probabilities of a trained segmentation run (its workdir), averaged
  # over each superpixel, join the node features; the GNN refines them.
  config.hybrid = ml_collections.ConfigDict()
  config.hybrid.cnn_workdir = ""
  return config
