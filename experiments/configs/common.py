"""Config keys shared by every segmentation experiment (documented in the README)."""

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
  """Defaults for data, train and optim; each experiment adds its `model` section."""
  config = ml_collections.ConfigDict()

  config.data = ml_collections.ConfigDict()
  config.data.name = "synthetic"
  config.data.data_dir = ""  # root of a dataset on disk; unused by the synthetic one
  config.data.image_size = 64  # synthetic only: its resolution, square
  config.data.seed = 0  # dataset generation seed (synthetic)
  config.data.preset = "default"  # synthetic only: "default" or "hard" (see data/synthetic.py)
  config.data.val_split = "val"
  # Unset (None): the dataset's own default (jaxseg.data.DATASETS). Sizes are (h, w) or one int.
  config.data.crop_size = placeholder(tuple)  # training crops; synthetic data is not augmented
  config.data.scale_range = placeholder(tuple)  # random scale before cropping, e.g. (0.5, 2.0)
  config.data.eval_window = placeholder(tuple)  # sliding-window evaluation; (0, 0): whole image
  config.data.eval_size = placeholder(tuple)  # pad val images to this canvas (varying sizes)
  config.data.flip = True  # random horizontal flips (with crop_size)
  config.data.photometric = True  # brightness/contrast/saturation/hue jitter (with crop_size)
  config.data.skip_bad_examples = False  # skip, log and count unreadable examples
  # Train on the first N examples of the train split only (0: all of it), e.g. to measure the
  # low-data regime; the synthetic split is procedural, 100,000 images.
  config.data.num_train_examples = 0
  # Extra training pairs (jaxseg.data.generated.write_pairs, e.g. a GAN's), added to the
  # train split; the same classes are required.
  config.data.extra_train_dir = ""
  # The share of training examples drawn from those pairs (0: each pair as often as each real
  # image, so 800 pairs beside 200 images make 80% of the batches).
  config.data.extra_train_fraction = 0.0
  # Dataset-specific constructor options; unset ones take the reader's default.
  config.data.options = ml_collections.ConfigDict()
  config.data.options.classes = placeholder(str)  # coco: "things" (80 + background) or "voc"
  config.data.options.labels = placeholder(str)  # coco: "instances", "panoptic" or "stuff"
  # coco: drop train images with at most this many labelled pixels (torchvision: voc, 1000)
  config.data.options.min_labelled_area = placeholder(int)
  config.data.worker_count = 0  # grain worker processes; 0 decodes in the main process
  config.data.prefetch = 2  # batches read and sent to the devices ahead of the step

  config.train = ml_collections.ConfigDict()
  config.train.steps = 360
  config.train.batch_size = 8  # global, over all devices and processes
  config.train.eval_batch_size = 0  # 0: same as batch_size
  config.train.checkpoint_every = 100
  config.train.keep_checkpoints = 2
  config.train.log_every = 10
  config.train.eval_every = 0  # 0: evaluate at the end only
  config.train.num_eval_examples = 0  # 0: the whole val split
  config.train.num_prediction_images = 6  # rows of predictions.png
  config.train.seed = 0
  config.train.max_nonfinite_steps = 5  # stop after this many consecutive skipped steps
  # Weights of the loss terms (ce, dice, focal); Dice counters the background's share of pixels.
  config.train.loss = ml_collections.ConfigDict({"ce": 1.0, "dice": 1.0, "focal": 0.0})

  config.optim = ml_collections.ConfigDict()
  config.optim.name = "adamw"  # or "sgd"
  config.optim.learning_rate = 2e-3
  config.optim.schedule = "poly"  # DeepLab's (1 - t/T)^0.9, or "cosine", "constant"
  config.optim.warmup_steps = 10
  config.optim.power = 0.9
  config.optim.end_learning_rate_factor = 0.0
  config.optim.weight_decay = 1e-4
  config.optim.momentum = 0.9  # sgd
  config.optim.nesterov = False  # sgd
  config.optim.b1 = 0.9  # adamw
  config.optim.b2 = 0.999  # adamw
  config.optim.clip_norm = 1.0  # global-norm clipping; 0 disables
  # With a pretrained backbone (model.pretrained): its learning rate = this x optim.learning_rate,
  # and it is held still (parameters and BN statistics) for the first freeze_backbone_steps.
  config.optim.backbone_lr_multiplier = 1.0
  config.optim.freeze_backbone_steps = 0
  return config


def placeholder(kind):
  """An optional (None by default) config value that can still be overridden by flag."""
  return config_dict.placeholder(kind)
