"""Pretrained RGB filters for inputs that are not RGB: segmentation_models_pytorch's rule, so
that a backbone adapted here starts where the same backbone adapted by smp starts.

One channel: the RGB kernels summed (a grey image then gives the response the RGB network
gave its grey version). C > 3 (or 2): the RGB kernels repeated cyclically over the C inputs
and scaled by 3/C, so the first layer's output keeps its scale for inputs of similar range.
"""

from __future__ import annotations

import numpy as np
from flax import traverse_util

from jaxseg.errors import JaxsegError


def adapt_first_conv(kernel: np.ndarray, in_channels: int, default: int = 3) -> np.ndarray:
  """A (kh, kw, default, out) kernel for `in_channels` inputs (smp's `patch_first_conv`)."""
  kernel = np.asarray(kernel)
  if kernel.ndim != 4 or kernel.shape[2] != default:
    raise JaxsegError(f"first convolution kernel {kernel.shape} does not take {default} "
                      "channels")
  if in_channels == default:
    return kernel
  if in_channels == 1:
    return kernel.sum(axis=2, keepdims=True)
  repeated = kernel[:, :, [i % default for i in range(in_channels)], :]
  return (repeated * (default / in_channels)).astype(kernel.dtype)


def adapt_input_channels(params: dict, model_shapes: dict[str, tuple], default: int = 3
                         ) -> tuple[dict, list[str]]:
  """(params, adapted paths): every conv kernel that takes `default` channels in `params`
  but another count in the model (`model_shapes`: "/"-joined path -> shape, as
  checkpoint.param_shapes gives) adapted by `adapt_first_conv`; everything else as it is."""
  flat = traverse_util.flatten_dict(params, sep="/")
  adapted = []
  for path, value in flat.items():
    shape = tuple(model_shapes.get(path, ()))
    value_shape = tuple(np.shape(value))
    if (len(shape) == 4 and len(value_shape) == 4 and value_shape[2] == default
        and shape[2] != default and shape[:2] + shape[3:] == value_shape[:2] + value_shape[3:]):
      flat[path] = adapt_first_conv(value, shape[2], default)
      adapted.append(path)
  return traverse_util.unflatten_dict(flat, sep="/"), adapted
