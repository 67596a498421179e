"""Small PyTorch module trees with the exact attribute names (hence state-dict keys) and
forward passes of torchvision's ResNet, timm's xception65 and timm's legacy_xception.

Written for the tests from the published architectures, so that the .pth/.safetensors
converters are checked key by key and numerically without torchvision or timm (which the
test extra also installs: test_weights_torch.py checks against the real libraries as well).
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def randomize_(module: nn.Module, seed: int) -> nn.Module:
  """He-scaled conv weights, random BN affine parameters and running statistics; eval mode."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
        if m.bias is not None:
          m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
      elif isinstance(m, nn.BatchNorm2d):
        m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
  return module.eval()


# --- torchvision ResNet (v1.5: stride on the 3x3) ---------------------------------------------

class Bottleneck(nn.Module):
  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU()
    self.downsample = downsample

  def forward(self, x):
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return self.relu(y + (self.downsample(x) if self.downsample is not None else x))


class ResNet(nn.Module):
  def __init__(self, layers, num_classes=1000):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU()
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    inplanes = 64
    for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
      stride = 1 if i == 0 else 2
      downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                 nn.BatchNorm2d(planes * 4))
      stage = [Bottleneck(inplanes, planes, stride, downsample)]
      stage += [Bottleneck(planes * 4, planes) for _ in range(blocks - 1)]
      setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
      inplanes = planes * 4
    self.fc = nn.Linear(2048, num_classes)

  def forward_features(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    return self.layer4(self.layer3(self.layer2(self.layer1(x))))


# --- timm xception65 (aligned Xception) --------------------------------------------------------

class ConvNormAct(nn.Module):
  def __init__(self, cin, cout, k, stride=1, act=True):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, k, stride, ((stride - 1) + (k - 1)) // 2, bias=False)
    self.bn = nn.BatchNorm2d(cout, eps=1e-3)
    self.act = nn.ReLU() if act else nn.Identity()

  def forward(self, x):
    return self.act(self.bn(self.conv(x)))


class AlignedSeparableConv(nn.Module):
  def __init__(self, cin, cout, stride, dilation, act):
    super().__init__()
    pad = ((stride - 1) + dilation * 2) // 2
    self.conv_dw = nn.Conv2d(cin, cin, 3, stride, pad, dilation, groups=cin, bias=False)
    self.bn_dw = nn.BatchNorm2d(cin, eps=1e-3)
    self.conv_pw = nn.Conv2d(cin, cout, 1, bias=False)
    self.bn_pw = nn.BatchNorm2d(cout, eps=1e-3)
    self.act = nn.ReLU() if act else nn.Identity()

  def forward(self, x):
    return self.act(self.bn_pw(self.conv_pw(self.act(self.bn_dw(self.conv_dw(x))))))


class XceptionModule(nn.Module):
  def __init__(self, cin, couts, stride, dilation, start_with_relu=True, no_skip=False):
    super().__init__()
    self.no_skip = no_skip
    self.shortcut = (ConvNormAct(cin, couts[-1], 1, stride, act=False)
                     if not no_skip and (couts[-1] != cin or stride != 1) else None)
    self.stack = nn.Sequential()
    for i, cout in enumerate(couts):
      if start_with_relu:
        self.stack.add_module(f"act{i + 1}", nn.ReLU())
      self.stack.add_module(f"conv{i + 1}", AlignedSeparableConv(
          cin, cout, stride if i == 2 else 1, dilation, act=not start_with_relu))
      cin = cout

  def forward(self, x):
    y = self.stack(x)
    if self.no_skip:
      return y
    return y + (self.shortcut(x) if self.shortcut is not None else x)


class Xception65(nn.Module):
  def __init__(self, output_stride=32, num_classes=1000):
    super().__init__()
    self.stem = nn.Sequential(ConvNormAct(3, 32, 3, 2), ConvNormAct(32, 64, 3, 1))
    cfg = [(64, (128,) * 3, 2), (128, (256,) * 3, 2), (256, (728,) * 3, 2)]
    cfg += [(728, (728,) * 3, 1)] * 16 + [(728, (728, 1024, 1024), 2)]
    self.blocks = nn.Sequential()
    reduction, dilation = 2, 1
    for i, (cin, couts, stride) in enumerate(cfg):
      block_dilation = dilation
      if stride > 1:
        if reduction * stride > output_stride:
          dilation, stride = dilation * stride, 1
        else:
          reduction *= stride
      self.blocks.add_module(str(i), XceptionModule(cin, couts, stride, block_dilation))
    self.blocks.add_module(str(len(cfg)), XceptionModule(
        1024, (1536, 1536, 2048), 1, dilation, start_with_relu=False, no_skip=True))
    self.head = nn.Module()
    self.head.fc = nn.Linear(2048, num_classes)

  def forward_features(self, x):
    return self.blocks(self.stem(x))


# --- timm legacy_xception (Cadene's port of Keras Xception) -------------------------------------

class LegacySeparableConv(nn.Module):
  def __init__(self, cin, cout):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cin, 3, 1, 1, groups=cin, bias=False)
    self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)

  def forward(self, x):
    return self.pointwise(self.conv1(x))


class LegacyBlock(nn.Module):
  def __init__(self, cin, cout, reps, stride=1, start_with_relu=True, grow_first=True):
    super().__init__()
    self.skip = nn.Conv2d(cin, cout, 1, stride, bias=False) if cout != cin or stride != 1 else None
    self.skipbn = nn.BatchNorm2d(cout) if self.skip is not None else None
    rep = []
    for i in range(reps):
      inc, outc = ((cin if i == 0 else cout), cout) if grow_first else (
          cin, cin if i < reps - 1 else cout)
      rep += [nn.ReLU(), LegacySeparableConv(inc, outc), nn.BatchNorm2d(outc)]
    if not start_with_relu:
      rep = rep[1:]
    if stride != 1:
      rep.append(nn.MaxPool2d(3, stride, 1))
    self.rep = nn.Sequential(*rep)

  def forward(self, x):
    return self.rep(x) + (self.skipbn(self.skip(x)) if self.skip is not None else x)


class LegacyXception(nn.Module):
  def __init__(self, num_classes=1000):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 32, 3, 2, 0, bias=False)
    self.bn1 = nn.BatchNorm2d(32)
    self.conv2 = nn.Conv2d(32, 64, 3, bias=False)
    self.bn2 = nn.BatchNorm2d(64)
    self.block1 = LegacyBlock(64, 128, 2, 2, start_with_relu=False)
    self.block2 = LegacyBlock(128, 256, 2, 2)
    self.block3 = LegacyBlock(256, 728, 2, 2)
    for i in range(4, 12):
      setattr(self, f"block{i}", LegacyBlock(728, 728, 3, 1))
    self.block12 = LegacyBlock(728, 1024, 2, 2, grow_first=False)
    self.conv3 = LegacySeparableConv(1024, 1536)
    self.bn3 = nn.BatchNorm2d(1536)
    self.conv4 = LegacySeparableConv(1536, 2048)
    self.bn4 = nn.BatchNorm2d(2048)
    self.fc = nn.Linear(2048, num_classes)

  def forward_features(self, x):
    relu = nn.functional.relu
    x = relu(self.bn2(self.conv2(relu(self.bn1(self.conv1(x))))))
    for i in range(1, 13):
      x = getattr(self, f"block{i}")(x)
    x = relu(self.bn3(self.conv3(x)))
    return relu(self.bn4(self.conv4(x)))


REFERENCES = {
    "resnet50": lambda: ResNet((3, 4, 6, 3)),
    "resnet101": lambda: ResNet((3, 4, 23, 3)),
    "xception65": Xception65,
    "legacy_xception": LegacyXception,
}


_TORCHVISION_OPS = None  # the op declarations below; a torch.library.Library lives as long as it


def import_torchvision():
  """torchvision, also where its C++ ops do not load.

  The registry's torchvision wheels are CUDA builds (0.28.0 is 0.28.0+cu130): their ops (nms,
  roi_align, ...) link libtorch_cuda, which the CPU build of torch that CI installs does not
  have, and torchvision's import then stops at registering a shape function for
  `torchvision::nms`. The models compared here are plain PyTorch and call none of those ops, so
  when the import fails that way, the two ops it registers functions for are declared (without
  kernels) and the import is retried. With a CPU build of torchvision the first import succeeds
  and nothing is declared.
  """
  global _TORCHVISION_OPS
  try:
    import torchvision  # pylint: disable=g-import-not-at-top
  except RuntimeError as error:
    if "torchvision::" not in str(error) or _TORCHVISION_OPS is not None:
      raise
    for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
      del sys.modules[name]  # the half-imported package, so that the retry starts afresh
    _TORCHVISION_OPS = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
      _TORCHVISION_OPS.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # pylint: disable=g-import-not-at-top
  return torchvision


def import_smp():
  """segmentation_models_pytorch, which imports timm and hence torchvision (see
  `import_torchvision`)."""
  import_torchvision()
  import segmentation_models_pytorch  # pylint: disable=g-import-not-at-top
  return segmentation_models_pytorch
