"""python -m experiments.compare --dataset=synthetic

The comparison table: every model trained under the same budget (train.steps of the same global
batch, so each sees the same number of training images) on one dataset, evaluated on its val
split, and an ensemble of them; compare.md lists pixel accuracy, mIoU, mean Dice, time per
epoch, parameters, GFLOPs per image, images/s and peak memory. More:

    python -m experiments.compare --dataset=camvid --data_dir=../shared/data/camvid \
        --budget=300 --config.data.crop_size=128 --config.data.scale_range=0.5,1.0
    python -m experiments.compare --models=unet,deeplab_resnet101 --budget=2epochs

`data.*` and the `train.*` keys below are shared by every model; `models.NAME` is that model's
own experiment config (its optimizer and architecture), e.g.
`--config.models.deeplab_xception.model.backbone=xception`. Unset keys take the dataset's
preset (jaxseg.studies.compare.PRESETS).
"""

import ml_collections

from experiments.configs import common
from experiments.configs import deeplab as deeplab_config
from experiments.configs import superpixel_gnn as gnn_config
from experiments.configs import unet as unet_config


def _unet(name, backbone=None):
  config = unet_config.get_config()
  config.model.name = name
  config.model.backbone = backbone
  return config


def _deeplab(backbone):
  config = deeplab_config.get_config()
  config.model.backbone = backbone
  return config


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.data = common.data_section(image_pipeline=True)
  # The first N train examples for every model (the synthetic split is procedural: its preset
  # takes 1000, which is also what "an epoch" means there); 0: the whole split.
  config.data.num_train_examples = common.placeholder(int)

  # The train.* keys every model shares (jaxseg.studies.compare.SHARED_TRAIN_KEYS): they
  # replace its own; its other train.* keys stay its experiment's.
  config.train = ml_collections.ConfigDict()
  config.train.steps = common.placeholder(int)  # the budget (--budget); unset: the preset's
  config.train.batch_size = 8
  config.train.eval_batch_size = 0
  config.train.seed = 0
  config.train.checkpoint_every = 50
  config.train.log_every = 10
  config.train.num_eval_examples = 0  # 0: the whole val split
  config.train.num_prediction_images = 4

  # Every model's own experiment config; only data.* and the train.* keys above are replaced.
  config.models = ml_collections.ConfigDict({
      "unet": _unet("unet"),
      "attention_unet": _unet("attention_unet"),
      "resnet50_unet": _unet("resnet50_unet", "resnet50"),
      # DeepLabV3+'s own Xception: the aligned Xception-65 of the paper.
      "deeplab_xception": _deeplab("xception65"),
      "deeplab_resnet101": _deeplab("resnet101"),
      "superpixel_gnn": gnn_config.get_config(),
  })
  config.compare = ml_collections.ConfigDict()
  # Which rows, in table order (--models).
  config.compare.models = ("unet,attention_unet,resnet50_unet,deeplab_xception,"
                           "deeplab_resnet101,superpixel_gnn")

  # Averages the members' probabilities; empty: every CNN row (the GNN's probabilities are
  # painted superpixels: a different kind of model, left out unless named here).
  config.ensemble = ml_collections.ConfigDict()
  config.ensemble.members = ""
  config.ensemble.weights = ""  # comma-separated, one per member; empty: equal

  # images/s: inference on batches of this many val-size images, median of `repeats`.
  config.profile = ml_collections.ConfigDict()
  config.profile.batch_size = 8
  config.profile.repeats = 3
  return config
