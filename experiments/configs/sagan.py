"""python -m experiments.sagan

SAGAN (Zhang et al. 2019) on the synthetic shapes, conditioned on each image's dominant shape
class; or unconditional (--config.model.conditional=False); or the mask-to-image GAN
(--config.model.kind=mask), which draws an image for a given label map. More:

    python -m experiments.sagan --dataset=camvid --data_dir=../shared/data/camvid \
        --config.data.crop_size=64 --config.model.conditional=False

The reference model (ImageNet 128x128) has ch = 64 in both networks; the defaults here are
narrower (32) so that a run fits a CPU, and the images are the dataset's (64x64 synthetic).
"""

import ml_collections

from experiments.configs import common


def get_config(*, data: bool = True) -> ml_collections.ConfigDict:
  """data=False: without `data`, for a study that gives its runs one shared data section."""
  config = ml_collections.ConfigDict()
  if data:
    config.data = common.data_section(image_pipeline=True)
    config.data.photometric = False  # colour jitter would teach the generator jittered colours
  # Scored by FID/KID (config.eval), not on val label maps; the losses are the GAN's own.
  config.train = common.train_section(val_metrics=False, steps=2000, batch_size=32,
                                      checkpoint_every=500, log_every=20)
  config.train.d_steps = 1  # discriminator updates per generator update (the reference: 1)
  config.train.ema_decay = 0.999  # of the generator's weights; samples use the average
  config.train.feature_matching = 0.0  # pix2pixHD's D-feature L1 (mask kind)
  config.train.l1 = 0.0  # L1 to the real image (mask kind)
  config.train.sample_every = 250
  config.train.num_samples = 32  # images in samples.png

  # SAGAN's two time-scale update rule; beta2 0.9 as in the paper (the released code: 0.999).
  config.optim = ml_collections.ConfigDict()
  config.optim.g_learning_rate = 1e-4
  config.optim.d_learning_rate = 4e-4
  config.optim.b1 = 0.0
  config.optim.b2 = 0.9

  config.model = ml_collections.ConfigDict()
  config.model.kind = "sagan"  # or "mask": label map (+ noise) -> image
  config.model.conditional = True  # sagan: class-conditional BN + projection discriminator
  config.model.background_class = common.placeholder(int)  # not a condition; default: class
  # 0 if the dataset calls it "background", else none
  config.model.z_dim = 128
  config.model.g_ch = 32
  config.model.d_ch = 32
  config.model.g_channels = (8, 8, 4, 2, 1)  # mask kind: multipliers of g_ch, coarse to fine
  config.model.attention_resolution = 32  # feature-map size of the attention block; 0: none
  config.model.dtype = "auto"

  config.eval = ml_collections.ConfigDict()
  config.eval.num_images = 256  # real val crops (and as many samples) for FID/KID
  config.eval.features = "random"  # or the directory of a converted backbone (ResNet-50...)
  config.eval.kid_subsets = 100
  return config
