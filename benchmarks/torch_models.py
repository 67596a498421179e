"""PyTorch twins of jaxseg's segmentation models, for side-by-side train-step benchmarks.

    python benchmarks/torch_models.py   # trainable parameters and output shapes, jaxseg vs torch

`build(name, num_classes)` returns, for each of NAMES, the network that the experiments'
configs (experiments/configs/unet.py, deeplab.py) build in jaxseg, layer for layer: the same
convolutions (kernel, stride, dilation, groups, channels, bias or not), BatchNorm with the same
epsilons (torch's momentum 0.1 is flax's 0.9), activations, bilinear resizes with half-pixel
centres (align_corners=False, as jax.image.resize) and 2x2 transposed convs. Modules are NCHW;
the benchmark runs them channels_last.

The backbones are the torchvision ResNet and timm xception65 trees of tests/torch_reference.py,
adapted to jaxseg's output stride and feature taps; everything else is named like the flax
modules (aspp/atrous1/depthwise/conv -> aspp.atrous1.depthwise.conv), so weights map one to
one. Initialisation is torch's default, not jaxseg's: it does not change what a step costs.
"""

from __future__ import annotations

import collections
import functools
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # for `tests` as a script

from jaxseg.backbones.resnet import stage_plan  # noqa: E402
from jaxseg.models.deeplab import ASPP_RATES  # noqa: E402
from tests import torch_reference  # noqa: E402

# name -> attention gates or not.
UNETS = {"unet": False, "attention_unet": True}
# name -> (backbone, separable ASPP and decoder convs).
DEEPLABS = {
    "deeplab_resnet50": ("resnet50", False),
    "deeplab_resnet101": ("resnet101", False),
    "deeplab_resnet101_separable": ("resnet101", True),
    "deeplab_xception65": ("xception65", False),
}
NAMES = (*UNETS, *DEEPLABS)


def _resize(x, size):
  """jaxseg.layers.resize_bilinear (half-pixel centres, no antialiasing)."""
  return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


# --- jaxseg.layers -----------------------------------------------------------------------------

class ConvBNAct(nn.Module):
  """Conv (no bias, symmetric padding d * (k - 1) // 2) -> BatchNorm -> optional ReLU."""

  def __init__(self, cin, cout, kernel_size=3, stride=1, dilation=1, groups=1, act=True):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, kernel_size, stride, dilation * (kernel_size - 1) // 2,
                          dilation, groups, bias=False)
    self.bn = nn.BatchNorm2d(cout)  # eps 1e-5, momentum 0.1: jaxseg's defaults
    self.act = nn.ReLU() if act else nn.Identity()

  def forward(self, x):
    return self.act(self.bn(self.conv(x)))


class SeparableConvBNAct(nn.Module):
  """Depthwise conv (dilated) -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU."""

  def __init__(self, cin, cout, kernel_size=3, dilation=1):
    super().__init__()
    self.depthwise = ConvBNAct(cin, cin, kernel_size, dilation=dilation, groups=cin)
    self.pointwise = ConvBNAct(cin, cout, 1)

  def forward(self, x):
    return self.pointwise(self.depthwise(x))


# --- backbones: tests/torch_reference.py's trees as jaxseg's trunks ----------------------------
# Each returns (stage1, stage4) features: DeepLab's low-level input (256 channels, stride 4)
# and the ASPP input (2048 channels, stride `output_stride`).

class ResNetTrunk(torch_reference.ResNet):
  """jaxseg's default-style ("torchvision", v1.5) ResNet: stride on the 3x3, no conv biases.

  The strides past `output_stride` become dilation following jaxseg's own stage plan (the
  first block of a newly dilated stage keeps the previous dilation, as torchvision does).
  Conv2d reads its stride/padding/dilation at call time, so the built convs are re-geared in
  place; no parameter changes. The ImageNet classifier is dropped, as jaxseg has none.
  """

  def __init__(self, stage_sizes, output_stride=16):
    super().__init__(stage_sizes)
    del self.fc
    for s, (stride, dilations, _) in enumerate(stage_plan(stage_sizes, output_stride)):
      stage = getattr(self, f"layer{s + 1}")
      stage[0].downsample[0].stride = (stride, stride)
      for j, (block, dilation) in enumerate(zip(stage, dilations)):
        block.conv2.stride = (stride, stride) if j == 0 else (1, 1)
        block.conv2.padding = block.conv2.dilation = (dilation, dilation)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    low = self.layer1(x)
    return low, self.layer4(self.layer3(self.layer2(low)))


class Xception65Trunk(torch_reference.Xception65):
  """Aligned Xception-65; torch_reference's tree already dilates past `output_stride` exactly
  as jaxseg does. The low-level features are jaxseg's "stage1" tap: the ReLU'd input of
  block 1's strided third separable conv (the last layer of its `stack`)."""

  def __init__(self, output_stride=16):
    super().__init__(output_stride)
    del self.head  # the ImageNet classifier

  def forward(self, x):
    x = self.blocks[0](self.stem(x))
    block = self.blocks[1]
    low = block.stack[:-1](x)
    x = block.stack[-1](low) + block.shortcut(x)
    return low, self.blocks[2:](x)


BACKBONES = {
    "resnet50": functools.partial(ResNetTrunk, (3, 4, 6, 3)),
    "resnet101": functools.partial(ResNetTrunk, (3, 4, 23, 3)),
    "xception65": Xception65Trunk,
}
BACKBONE_CHANNELS = (256, 2048)  # (stage1, stage4) of all three


# --- jaxseg.models.deeplab ---------------------------------------------------------------------

class ASPP(nn.Module):
  """1x1, three atrous 3x3 and image pooling branches, concatenated, 1x1 fuse, dropout."""

  def __init__(self, cin, features=256, rates=(6, 12, 18), separable=False, dropout_rate=0.1):
    super().__init__()
    self.conv1x1 = ConvBNAct(cin, features, 1)
    conv = SeparableConvBNAct if separable else ConvBNAct
    self.atrous = [f"atrous{i + 1}" for i in range(len(rates))]
    for name, rate in zip(self.atrous, rates):
      self.add_module(name, conv(cin, features, 3, dilation=rate))
    # In training, torch's BatchNorm refuses this 1x1 map at batch size 1 (one value per
    # channel); jaxseg's computes it. Benchmark with batch >= 2.
    self.pool = ConvBNAct(cin, features, 1)
    self.project = ConvBNAct(features * (len(rates) + 2), features, 1)
    self.dropout = nn.Dropout(dropout_rate)

  def forward(self, x):
    branches = [self.conv1x1(x)] + [getattr(self, name)(x) for name in self.atrous]
    # Bilinear upsampling of the 1x1 image-level features is a broadcast.
    pooled = self.pool(x.mean((2, 3), keepdim=True))
    branches.append(pooled.expand(-1, -1, *x.shape[2:]))
    return self.dropout(self.project(torch.cat(branches, 1)))


class DeepLabV3Plus(nn.Module):
  """Backbone -> ASPP; decoder: 48-channel projection of the stride-4 features, concatenated
  after the upsampled ASPP output, two 3x3 convs, 1x1 classifier, resize to the input."""

  def __init__(self, num_classes, backbone, output_stride=16, aspp_features=256,
               low_level_features=48, decoder_features=256, separable=False, dropout_rate=0.1):
    super().__init__()
    low_channels, high_channels = BACKBONE_CHANNELS
    self.backbone = backbone(output_stride=output_stride)
    self.aspp = ASPP(high_channels, aspp_features, ASPP_RATES[output_stride], separable,
                     dropout_rate)
    self.low_level = ConvBNAct(low_channels, low_level_features, 1)
    conv = SeparableConvBNAct if separable else ConvBNAct
    self.decoder1 = conv(aspp_features + low_level_features, decoder_features, 3)
    self.decoder2 = conv(decoder_features, decoder_features, 3)
    self.classifier = nn.Conv2d(decoder_features, num_classes, 1)  # with bias, as flax's

  def forward(self, images):
    low, x = self.backbone(images)
    low = self.low_level(low)
    x = torch.cat([_resize(self.aspp(x), low.shape[2:]), low], 1)
    x = self.classifier(self.decoder2(self.decoder1(x)))
    return _resize(x, images.shape[2:])


# --- jaxseg.models.unet ------------------------------------------------------------------------

def _pad_to_multiple(x, multiple):
  """Zero-pads H and W at the end up to a multiple of the U-Net's total stride; the logits
  are cropped back."""
  ph, pw = -x.shape[2] % multiple, -x.shape[3] % multiple
  return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


class DoubleConv(nn.Sequential):
  """Two 3x3 conv-BN-ReLU."""

  def __init__(self, cin, cout):
    super().__init__(collections.OrderedDict(conv1=ConvBNAct(cin, cout),
                                             conv2=ConvBNAct(cout, cout)))


class AttentionGate(nn.Module):
  """Additive attention: the skip x (2x2 stride-2 conv, no bias) and the coarser decoder
  features g (1x1 conv) are summed; ReLU, 1x1 conv, sigmoid and 2x bilinear upsampling give
  the map that weights x; then a 1x1 conv + BN without activation."""

  def __init__(self, channels, g_channels, inter_channels):
    super().__init__()
    self.theta_x = nn.Conv2d(channels, inter_channels, 2, 2, bias=False)
    self.phi_g = nn.Conv2d(g_channels, inter_channels, 1)
    self.psi = nn.Conv2d(inter_channels, 1, 1)
    self.out = ConvBNAct(channels, channels, 1, act=False)

  def forward(self, x, g):
    alpha = torch.sigmoid(self.psi(F.relu(self.theta_x(x) + self.phi_g(g))))
    # jaxseg.layers.upsample2x_bilinear: half-pixel centres, edges clamped.
    alpha = F.interpolate(alpha, scale_factor=2, mode="bilinear", align_corners=False)
    return self.out(x * alpha)


class UNet(nn.Module):
  """U-Net with BatchNorm (jaxseg's default), widths doubling from `features` over `depth`
  levels, 2x2 transposed-conv upsampling (jaxseg's UpConv2x2), optional attention gates."""

  def __init__(self, num_classes, features=64, depth=4, attention=False, in_channels=3):
    super().__init__()
    self.depth, self.attention = depth, attention
    widths = [features * 2 ** level for level in range(depth + 1)]
    for level in range(depth):
      self.add_module(f"down{level}", DoubleConv(widths[level - 1] if level else in_channels,
                                                 widths[level]))
    self.bottleneck = DoubleConv(widths[depth - 1], widths[depth])
    for level in reversed(range(depth)):
      if attention:
        self.add_module(f"gate{level}", AttentionGate(widths[level], widths[level + 1],
                                                      widths[level] // 2))
      self.add_module(f"upconv{level}", nn.ConvTranspose2d(widths[level + 1], widths[level],
                                                           2, 2))
      self.add_module(f"up{level}", DoubleConv(2 * widths[level], widths[level]))
    self.classifier = nn.Conv2d(features, num_classes, 1)

  def forward(self, images):
    h, w = images.shape[2:]
    x = _pad_to_multiple(images, 2 ** self.depth)
    skips = []
    for level in range(self.depth):
      x = getattr(self, f"down{level}")(x)
      skips.append(x)
      x = F.max_pool2d(x, 2)
    x = self.bottleneck(x)
    for level in reversed(range(self.depth)):
      skip = getattr(self, f"gate{level}")(skips[level], x) if self.attention else skips[level]
      x = getattr(self, f"upconv{level}")(x)
      x = getattr(self, f"up{level}")(torch.cat([skip, x], 1))
    return self.classifier(x)[:, :, :h, :w]


# --- entry points ------------------------------------------------------------------------------

def build(name: str, num_classes: int) -> nn.Module:
  """The torch twin of the jaxseg model that the experiments build for `name` (see NAMES)."""
  if name in UNETS:
    return UNet(num_classes, attention=UNETS[name])
  if name in DEEPLABS:
    backbone, separable = DEEPLABS[name]
    return DeepLabV3Plus(num_classes, BACKBONES[backbone], separable=separable)
  raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(NAMES)}")


def count_params(module: nn.Module) -> int:
  """Trainable parameters (BatchNorm running statistics are buffers, not counted)."""
  return sum(p.numel() for p in module.parameters() if p.requires_grad)


def jaxseg_config(name: str):
  """The experiment config of the jaxseg twin of `name` (its model section as --variant or
  --backbone set it)."""
  from experiments.configs import deeplab as deeplab_config
  from experiments.configs import unet as unet_config

  if name in UNETS:
    config = unet_config.get_config()
    config.model.name = name  # the registry's name, as --variant sets it
  else:
    config = deeplab_config.get_config()
    config.model.backbone, config.model.separable = DEEPLABS[name]
  return config


def jaxseg_model(name: str, num_classes: int):
  """The jaxseg model for `name`, with the model arguments of the experiments' configs."""
  from jaxseg.models import create_model
  from jaxseg.train import build

  config = jaxseg_config(name)
  return create_model(config.model.name, num_classes=num_classes,
                      backbone=config.model.backbone, **build.model_kwargs(config))


def main(num_classes: int = 19, size: int = 64) -> int:
  """Prints both trainable parameter counts and output shapes; 1 if any model differs."""
  import jax
  import jax.numpy as jnp

  print(f"{'model':<28} {'jaxseg params':>14} {'torch params':>14}  output (jaxseg NHWC, "
        f"torch NCHW)")
  failures = 0
  for name in NAMES:
    logits, variables = jaxseg_model(name, num_classes).init_with_output(
        jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    jax_params = sum(x.size for x in jax.tree.leaves(variables["params"]))
    model = build(name, num_classes).eval()
    with torch.no_grad():
      out = model(torch.zeros(1, 3, size, size))
    torch_params = count_params(model)
    n, h, w, k = logits.shape
    same = jax_params == torch_params and tuple(out.shape) == (n, k, h, w)
    failures += not same
    print(f"{name:<28} {jax_params:>14,} {torch_params:>14,}  {tuple(logits.shape)} "
          f"{tuple(out.shape)}  {'OK' if same else 'DIFFERENT'}")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
