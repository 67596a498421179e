"""python -m experiments.unet --variant=attention

The U-Net family on the synthetic shapes: --variant=unet (Ronneberger et al. 2015),
attention (Oktay et al. 2018) or resnet50 (a U-Net decoder on a ResNet-50 encoder, which
takes --config.model.pretrained). More:

    python -m experiments.unet --variant=resnet50 --config.model.pretrained=pretrained/r50 \
        --config.optim.backbone_lr_multiplier=0.1

Variant-specific keys are None here and take the model's own default; setting one that the
chosen variant does not have is an error.
"""

import ml_collections

from experiments.configs import common

# --variant -> registered model name.
VARIANTS = {"unet": "unet", "attention": "attention_unet", "resnet50": "resnet50_unet"}


def get_config(*, data: bool = True) -> ml_collections.ConfigDict:
  """data=False: without `data`, for a study that gives its runs one shared data section."""
  config = ml_collections.ConfigDict()
  if data:
    config.data = common.data_section(image_pipeline=True)
  config.train = common.train_section(val_metrics=True)
  common.add_segmentation_loss(config.train)
  config.optim = common.optim_section(backbone=True)  # resnet50 takes model.pretrained

  config.model = ml_collections.ConfigDict()
  config.model.name = "attention_unet"  # set by --variant
  config.model.dtype = "auto"  # bfloat16 on GPU/TPU, float32 on CPU
  # unet / attention: widths double from `features` over `depth` levels (64, 4 in the paper).
  config.model.features = common.placeholder(int)
  config.model.depth = common.placeholder(int)
  config.model.batch_norm = common.placeholder(bool)  # True by default
  # resnet50: the encoder (any registered backbone), its decoder widths, pretrained weights.
  config.model.backbone = common.placeholder(str)  # "resnet50" for --variant=resnet50
  config.model.decoder_features = common.placeholder(tuple)  # (256, 128, 64, 32, 16)
  config.model.pretrained = ""
  # A model file (jaxseg.save_pretrained, or experiments.export --format=safetensors) to start
  # from: every weight of the same architecture, the head re-initialised when the class
  # count differs.
  config.model.init_from = ""
  return config
