"""Config sections that the experiments compose (their keys are documented in the README).

Each experiment's get_config() assembles the sections it uses, so that every key it has is
one its task reads: the segmentation models take all of them; the superpixel GNN builds graphs
from whole images (no image pipeline) and has no backbone; the GANs have their own losses,
optimizers and evaluation.
"""

import ml_collections
from ml_collections import config_dict


def data_section(*, image_pipeline: bool) -> ml_collections.ConfigDict:
  """The dataset, its split and extra pairs; with `image_pipeline`, also the crops, scales,
  colour jitter and evaluation windows of image batches, and the loader that makes them."""
  data = ml_collections.ConfigDict()
  data.name = "synthetic"
  data.data_dir = ""  # root of a dataset on disk; unused by the synthetic one
  data.image_size = 64  # synthetic only: its resolution, square
  data.seed = 0  # dataset generation seed (synthetic)
  data.preset = "default"  # synthetic only: "default" or "hard" (see data/synthetic.py)
  data.train_split = "train"  # voc: "train_aug" with data.options.sbd_dir
  # Without masks/val, this seeded share (by data.seed) of a folder dataset's train split is val.
  data.val_fraction = 0.1
  data.val_split = "val"
  data.flip = True  # random horizontal flips (with crop_size)
  data.skip_bad_examples = False  # skip, log and count unreadable examples
  # Train on the first N examples of the train split only (0: all of it), e.g. to measure the
  # low-data regime; the synthetic split is procedural, 100,000 images.
  data.num_train_examples = 0
  # Extra training pairs (jaxseg.data.generated.write_pairs, e.g. a GAN's), added to the
  # train split; the same classes are required.
  data.extra_train_dir = ""
  # The share of training examples drawn from those pairs (0: each pair as often as each real
  # image, so 800 pairs beside 200 images make 80% of the batches).
  data.extra_train_fraction = 0.0
  # Dataset-specific constructor options; unset ones take the reader's default.
  data.options = ml_collections.ConfigDict()
  data.options.classes = placeholder(str)  # coco: "things" (80 + background) or "voc"
  data.options.labels = placeholder(str)  # coco: "instances", "panoptic" or "stuff"
  # coco: drop train images with at most this many labelled pixels (torchvision: voc, 1000)
  data.options.min_labelled_area = placeholder(int)
  data.options.sbd_dir = placeholder(str)  # voc: SBD (benchmark_RELEASE/dataset) for train_aug
  if image_pipeline:
    # Unset (None): the dataset's own default (jaxseg.data.DATASETS). Sizes are (h, w) or one int.
    data.crop_size = placeholder(tuple)  # training crops; synthetic data is not augmented
    data.scale_range = placeholder(tuple)  # random scale before cropping, e.g. (0.5, 2.0)
    data.eval_window = placeholder(tuple)  # sliding-window evaluation; (0, 0): whole image
    data.eval_size = placeholder(tuple)  # pad val images to this canvas (varying sizes)
    data.photometric = True  # brightness/contrast/saturation/hue jitter (with crop_size)
    data.worker_count = 0  # grain worker processes; 0 decodes in the main process
    data.prefetch = 2  # batches read and sent to the devices ahead of the step
    # Input channels: 0 reads them from the data (folder datasets: 1, 3, 4 or more).
    data.in_channels = 0
    # How images become model inputs: "auto" is the model's usual ImageNet / pretrained
    # normalisation for 8-bit RGB and the train split's own per-channel statistics otherwise
    # (computed once, cached in the workdir); "dataset" those for RGB too; "imagenet".
    # data.mean / data.std, one number per channel, replace both.
    data.normalize = "auto"
    data.mean = placeholder(tuple)
    data.std = placeholder(tuple)
    # predictions.png of images that are not RGB: the band shown (one, grey) or the three shown
    # as RGB, e.g. (3, 2, 1); unset: RGB as it is, else the first band.
    data.display_bands = placeholder(tuple)
  return data


def train_section(*, val_metrics: bool, steps: int = 360, batch_size: int = 8,
                  checkpoint_every: int = 100, log_every: int = 10) -> ml_collections.ConfigDict:
  """What every training loop reads: budget, batch, cadence, seed, non-finite policy; with
  `val_metrics`, also how the run is scored on the val split (mIoU, predictions.png)."""
  train = ml_collections.ConfigDict()
  train.steps = steps
  train.batch_size = batch_size  # global, over all devices and processes
  train.checkpoint_every = checkpoint_every
  train.keep_checkpoints = 2
  train.log_every = log_every
  train.seed = 0
  train.max_nonfinite_steps = 5  # stop after this many consecutive skipped steps
  # An average of the weights (and BatchNorm statistics) with TF's warm-up, e.g. 0.999; what
  # evaluation also scores and finished runs use by default (0: off).
  train.ema_decay = 0.0
  if val_metrics:
    train.eval_batch_size = 0  # 0: same as batch_size
    train.eval_every = 0  # 0: evaluate at the end only
    train.num_eval_examples = 0  # 0: the whole val split
    train.num_prediction_images = 6  # rows of predictions.png
    # Keep the checkpoint with the best val score beside the last keep_checkpoints: "miou",
    # "ema/miou", ... (needs eval_every > 0; "": off). load_run returns it by default.
    train.keep_best = ""
    # Split the batch into this many micro-batches, gradients averaged before one update:
    # the same batch in less memory (BatchNorm then sees micro-batches; docs/training.md).
    train.accumulate_steps = 1
  return train


def add_segmentation_loss(train: ml_collections.ConfigDict) -> None:
  """`train.loss` of a pixel classifier, the weights of its terms (Dice counters the
  background's share of pixels; the rest are off), their options, and class weights."""
  train.loss = ml_collections.ConfigDict(
      {"ce": 1.0, "dice": 1.0, "focal": 0.0, "lovasz": 0.0, "tversky": 0.0, "ohem": 0.0})
  train.loss_options = ml_collections.ConfigDict({
      # Salehi et al.: alpha weighs false positives, beta false negatives (0.5/0.5 is Dice).
      "tversky": {"alpha": 0.5, "beta": 0.5, "gamma": 1.0},
      "lovasz": {"per_image": False},
      # mmsegmentation's OHEM: pixels whose true-class probability is under thresh, at least
      # min_kept of them.
      "ohem": {"thresh": 0.7, "min_kept": 100000},
  })
  # Per-class weights of ce, focal and ohem (and Dice's class mean): "" none; "auto"
  # median-frequency balancing from the train masks (computed once, cached in the workdir);
  # or one number per class, "1,5,2".
  train.class_weights = ""


def optim_section(*, backbone: bool, learning_rate: float = 2e-3,
                  warmup_steps: int = 10) -> ml_collections.ConfigDict:
  """One optimizer and its schedule; with `backbone`, also how a (pretrained) backbone is
  trained: its own learning rate and a frozen start."""
  optim = ml_collections.ConfigDict()
  optim.name = "adamw"  # or "sgd"
  optim.learning_rate = learning_rate
  optim.schedule = "poly"  # DeepLab's (1 - t/T)^0.9, or "cosine", "constant"
  optim.warmup_steps = warmup_steps
  optim.power = 0.9
  optim.end_learning_rate_factor = 0.0
  optim.weight_decay = 1e-4
  optim.momentum = 0.9  # sgd
  optim.nesterov = False  # sgd
  optim.b1 = 0.9  # adamw
  optim.b2 = 0.999  # adamw
  optim.clip_norm = 1.0  # global-norm clipping; 0 disables
  if backbone:
    # With a pretrained backbone (model.pretrained): its learning rate = this x
    # optim.learning_rate, and it is held still (parameters and BN statistics) for the first
    # freeze_backbone_steps.
    optim.backbone_lr_multiplier = 1.0
    optim.freeze_backbone_steps = 0
  return optim


def placeholder(kind):
  """An optional (None by default) config value that can still be overridden by flag."""
  return config_dict.placeholder(kind)
