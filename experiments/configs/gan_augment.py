"""python -m experiments.gan_augment

Does GAN augmentation help? A mask-to-image GAN is trained on the real train split, draws
`augment.num_pairs` images for real and perturbed label maps, and a U-Net is trained twice with
the same seed and number of steps: on the real split, and on the real split + the pairs.
`data.*` is shared by the GAN and the segmentation model; `gan.*` is experiments.sagan's config
and `segmentation.*` experiments.unet's. More:

    python -m experiments.gan_augment --dataset=camvid --data_dir=../shared/data/camvid \
        --config.data.crop_size=64 --config.augment.seeds='(0, 1, 2)'

The defaults are the low-data regime, where extra images could matter: 200 real train images of
the synthetic shapes, 800 generated pairs (half of them from perturbed maps) making a quarter
of the augmented arm's examples, three seeds per arm; and sized for a CPU: 32x32 images, a GAN of 1.3 M + 0.2 M parameters for 2000 steps.
"""

import ml_collections

from experiments.configs import common
from experiments.configs import sagan as sagan_config
from experiments.configs import unet as unet_config


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.data = common.data_section(image_pipeline=True)
  config.data.num_train_examples = 200  # real train images (0: the whole split)
  config.data.image_size = 32  # synthetic; other datasets: data.crop_size sets the pair size
  # A quarter of the real+generated arm's examples are generated pairs, the rest real: the
  # pairs supplement the real images rather than outnumber them (0: each pair as often as each
  # real image, which with these defaults makes 80% of the examples generated).
  config.data.extra_train_fraction = 0.25

  config.gan = sagan_config.get_config(data=False)
  config.gan.model.kind = "mask"
  # pix2pixHD's discriminator-feature matching (weight 10) steadies the conditional GAN.
  config.gan.train.feature_matching = 10.0
  config.gan.model.g_ch = 16
  config.gan.model.d_ch = 16
  config.gan.model.g_channels = (4, 4, 2, 1)  # 8x smaller than the image, up to full size
  config.gan.train.steps = 2000
  config.gan.train.batch_size = 16
  config.gan.train.sample_every = 500
  config.gan.train.num_samples = 16
  config.gan.eval.num_images = 256

  config.segmentation = unet_config.get_config(data=False)
  config.segmentation.model.name = "unet"
  config.segmentation.model.features = 16
  config.segmentation.train.steps = 600
  config.segmentation.train.batch_size = 16

  config.augment = ml_collections.ConfigDict()
  config.augment.num_pairs = 800  # generated pairs added to the real train split
  config.augment.perturbed_fraction = 0.5  # of the pairs, from perturbed label maps
  config.augment.max_objects = 3  # objects of another map pasted into a perturbed map
  config.augment.seed = 0  # which maps, crops and noise the pairs get
  # Each seed trains both arms (real, real + generated) once: summary.json has the mean, the
  # standard deviation and the paired difference.
  config.augment.seeds = (0, 1, 2)
  return config
