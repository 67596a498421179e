"""What each convertible network is in jaxseg terms: backbone, constructor kwargs, preprocessing,
and the source name of every jaxseg variable.

Mapping is driven by the jaxseg side: every parameter and BatchNorm statistic of the backbone
asks for one source tensor by name, so a missing tensor, an unexpected one or a wrong shape is
found and named before anything is written.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

from jaxseg.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from jaxseg.errors import JaxsegError

# How the source network expects its input, on uint8 RGB images: optionally reverse the
# channels, then (x - mean) / std per channel on the 0-255 scale.
PREPROCESSING = {
    # keras.applications.resnet.preprocess_input ("caffe"): BGR, ImageNet mean subtracted.
    "caffe": {"channels": "BGR", "mean": [103.939, 116.779, 123.68], "std": [1.0, 1.0, 1.0]},
    # keras.applications.xception.preprocess_input ("tf") and timm's Inception mean/std: [-1, 1].
    "tf": {"channels": "RGB", "mean": [127.5] * 3, "std": [127.5] * 3},
    # torchvision and timm ResNets: RGB, ImageNet mean / std.
    "torch": {"channels": "RGB", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
}

# jaxseg leaf name -> source tensor name, for convs and for BatchNorms.
KERAS_CONV = {"kernel": "kernel", "bias": "bias"}
KERAS_BN = {"scale": "gamma", "bias": "beta", "mean": "moving_mean", "var": "moving_variance"}
TORCH_CONV = {"kernel": "weight", "bias": "bias"}
TORCH_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


@dataclasses.dataclass(frozen=True)
class Arch:
  """A source network: which jaxseg backbone reproduces it and where its tensors live.

  `source_module(path)` turns a jaxseg module path (e.g. ("stage1", "block0", "conv1", "bn"))
  into the source's name for that layer; `ignore` matches source tensors that are not part of
  the trunk (classifier, BN step counters); `renumber` lists Keras auto-named layer prefixes
  whose numbering depends on what was built before and is normalised to 0, 1, 2, ...
  """

  source: str  # "keras" or "torch"
  name: str  # --arch
  backbone: str
  kwargs: dict
  preprocessing: str
  source_module: Callable[[tuple[str, ...]], str]
  ignore: str
  renumber: tuple[str, ...] = ()

  def source_key(self, path: tuple[str, ...]) -> str:
    """Source tensor name for a jaxseg variable path (module path + leaf name)."""
    *module, leaf = path
    module_name = self.source_module(tuple(module))
    is_bn = leaf in ("scale", "mean", "var") or (leaf == "bias" and _is_bn(module))
    if self.source == "keras":
      if module[-1] in ("depthwise", "pointwise"):  # Keras SeparableConv2D holds both kernels
        return f"{module_name}/{module[-1]}_kernel"
      return f"{module_name}/{(KERAS_BN if is_bn else KERAS_CONV)[leaf]}"
    return f"{module_name}.{(TORCH_BN if is_bn else TORCH_CONV)[leaf]}"


def _is_bn(module: tuple[str, ...]) -> bool:
  """BatchNorm modules: `bn` inside ConvBNAct, Keras-style `*_bn` / `batch_normalization*`."""
  last = module[-1]
  return last == "bn" or last.endswith("_bn") or last.startswith("batch_normalization")


def _num(name: str, prefix: str) -> int:
  return int(name[len(prefix):])


def keras_resnet(module):
  """stem/{conv,bn} -> conv1_{conv,bn}; stageS/blockJ/convI|downsample/X -> convS+1_blockJ+1_I_X."""
  if module[0] == "stem":
    return f"conv1_{module[1]}"
  stage, block, layer, kind = module
  index = "0" if layer == "downsample" else layer[len("conv"):]
  return f"conv{_num(stage, 'stage') + 1}_block{_num(block, 'block') + 1}_{index}_{kind}"


def torch_resnet(module):
  """torchvision / timm names: conv1, bn1, layerS.J.{convI,bnI,downsample.{0,1}}."""
  if module[0] == "stem":
    return {"conv": "conv1", "bn": "bn1"}[module[1]]
  stage, block, layer, kind = module
  base = f"layer{_num(stage, 'stage')}.{_num(block, 'block')}"
  if layer == "downsample":
    return f"{base}.downsample.{0 if kind == 'conv' else 1}"
  return f"{base}.{kind}{layer[len('conv'):]}"


def keras_layer(module):
  """jaxseg's Xception and Inception-v3 already use the Keras layer names."""
  return module[0]


# timm legacy_xception: Keras block K is timm block K-1; its Sequential `rep` interleaves
# ReLU, SeparableConv2d, BatchNorm (block1 starts without the ReLU).
_LEGACY_SKIPS = (1, 2, 3, 12)  # timm blocks with a projection: conv2d, conv2d_1, ...
_LEGACY_TOP = {"block1_conv1": "conv1", "block1_conv1_bn": "bn1", "block1_conv2": "conv2",
               "block1_conv2_bn": "bn2", "block14_sepconv1": "conv3", "block14_sepconv1_bn": "bn3",
               "block14_sepconv2": "conv4", "block14_sepconv2_bn": "bn4"}


def torch_legacy_xception(module):
  name = module[0]
  if name in _LEGACY_TOP:
    base = _LEGACY_TOP[name]
  elif m := re.fullmatch(r"(conv2d|batch_normalization)(?:_(\d+))?", name):
    block = _LEGACY_SKIPS[int(m.group(2) or 0)]
    return f"block{block}.{'skip' if m.group(1) == 'conv2d' else 'skipbn'}"
  else:
    m = re.fullmatch(r"block(\d+)_sepconv(\d)(_bn)?", name)
    block, conv = int(m.group(1)) - 1, int(m.group(2))
    index = 3 * (conv - 1) + (0 if block == 1 else 1) + (1 if m.group(3) else 0)
    base = f"block{block}.rep.{index}"
  if len(module) > 1:  # the depthwise / pointwise halves of a separable conv
    return f"{base}.{'conv1' if module[1] == 'depthwise' else 'pointwise'}"
  return base


def torch_xception65(module):
  """timm xception65: stem.{0,1}.{conv,bn}; blocks.I.stack.convK.{conv,bn}_{dw,pw}; shortcut."""
  if module[0] in ("stem1", "stem2"):
    return f"stem.{_num(module[0], 'stem') - 1}.{module[1]}"
  block = f"blocks.{_num(module[0], 'block')}"
  if module[1] == "shortcut":
    return f"{block}.shortcut.{module[2]}"
  half = "dw" if module[2] == "depthwise" else "pw"
  return f"{block}.stack.conv{_num(module[1], 'sepconv')}.{module[3]}_{half}"


_KERAS_TOP = r"(predictions|fc\d*|probs)/.*"  # the ImageNet classifier, when saved with it
_TORCH_TOP = r"(fc|head\.fc|classifier|last_linear)\.(weight|bias)|.*\.num_batches_tracked"

ARCHS = {(a.source, a.name): a for a in (
    Arch("keras", "resnet50", "resnet50", {"style": "keras"}, "caffe", keras_resnet, _KERAS_TOP),
    Arch("keras", "resnet101", "resnet101", {"style": "keras"}, "caffe", keras_resnet,
         _KERAS_TOP),
    Arch("keras", "xception", "xception", {}, "tf", keras_layer, _KERAS_TOP,
         renumber=("conv2d", "batch_normalization")),
    Arch("keras", "inception_v3", "inception_v3", {}, "tf", keras_layer, _KERAS_TOP,
         renumber=("conv2d", "batch_normalization")),
    Arch("torch", "resnet50", "resnet50", {}, "torch", torch_resnet, _TORCH_TOP),
    Arch("torch", "resnet101", "resnet101", {}, "torch", torch_resnet, _TORCH_TOP),
    Arch("torch", "xception65", "xception65", {}, "tf", torch_xception65, _TORCH_TOP),
    Arch("torch", "legacy_xception", "xception", {"pool_padding": "torch", "bn_epsilon": 1e-5},
         "tf", torch_legacy_xception, _TORCH_TOP),
)}


def get_arch(source: str, arch: str) -> Arch:
  if (source, arch) not in ARCHS:
    valid = sorted({s for s, _ in ARCHS})
    if source not in valid:
      raise JaxsegError(f"--source={source!r} is not one of {', '.join(valid)}")
    names = sorted(a for s, a in ARCHS if s == source)
    raise JaxsegError(f"--arch={arch!r} has no {source} converter; valid: {', '.join(names)}")
  return ARCHS[(source, arch)]
