"""python -m experiments.deeplab --backbone=resnet101

DeepLabV3+ on the synthetic shapes (the main job). More:

    python -m experiments.deeplab --backbone=resnet50 --config.train.steps=400 \
        --config.model.output_stride=8 --workdir=runs/r50_os8

The defaults train ResNet-101 DeepLabV3+ from scratch in under 10 minutes on a 2-core CPU
(compile included) and reach a val mIoU above 0.5 on the synthetic shapes; on an accelerator
raise data.image_size, train.batch_size and train.steps.

Real data (crop size, scales and evaluation from the dataset's defaults, jaxseg.data.DATASETS):

    python -m experiments.deeplab --backbone=resnet50 --dataset=camvid \
        --data_dir=../shared/data/camvid
"""

import ml_collections

from experiments.configs import common


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.data = common.data_section(image_pipeline=True)
  config.train = common.train_section(val_metrics=True)
  common.add_segmentation_loss(config.train)
  config.optim = common.optim_section(backbone=True)

  config.model = ml_collections.ConfigDict()
  config.model.name = "deeplabv3plus"
  config.model.backbone = "resnet101"  # set by --backbone
  # A converted ImageNet backbone (python -m jaxseg.weights.convert ... OUTPUT_DIR); its
  # preprocessing replaces the default ImageNet mean/std.
  config.model.pretrained = ""
  # A model file (jaxseg.save_pretrained, or experiments.export --format=safetensors) to start
  # from: every weight of the same architecture, the head re-initialised when the class
  # count differs.
  config.model.init_from = ""
  config.model.output_stride = 16
  config.model.multi_grid = common.placeholder(tuple)  # e.g. (1, 2, 4)
  config.model.aspp_features = 256
  config.model.decoder_features = 256
  config.model.low_level_features = 48
  config.model.separable = False  # depthwise-separable ASPP and decoder convs
  config.model.dropout_rate = 0.1
  config.model.dtype = "auto"  # bfloat16 on GPU/TPU, float32 on CPU
  return config
