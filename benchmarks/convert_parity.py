"""Weight conversion at full size: file size, conversion time and feature parity per arch.

    python benchmarks/convert_parity.py            # Keras models + the PyTorch key trees
    python benchmarks/convert_parity.py --archs=keras:xception,torch:xception65

Each reference network gets random weights and BatchNorm statistics (as in the tests), is saved
in the format users download (Keras 2 .h5 for Keras, .safetensors and .pth for PyTorch),
converted with `jaxseg.weights.convert_file`, and compared on random images at its ImageNet
resolution: max |jaxseg - reference| over max |reference| of the final feature map.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402

from jaxseg import weights  # noqa: E402

KERAS = {"resnet50": ("ResNet50", "resnet", 224), "resnet101": ("ResNet101", "resnet", 224),
         "xception": ("Xception", "xception", 299)}
TORCH = {"resnet50": 224, "resnet101": 224, "xception65": 299, "legacy_xception": 299}


def _row(source, arch, fmt, path, directory, reference_fn, images):
  start = time.perf_counter()
  weights.convert_file(source, arch, path, os.path.join(directory, f"{arch}_{fmt}"))
  seconds = time.perf_counter() - start
  module, variables, preprocess = weights.load_backbone(os.path.join(directory, f"{arch}_{fmt}"))
  got = np.asarray(module.apply(variables, preprocess(images), train=False)["stage4"])
  expected = reference_fn(images)
  error = float(np.abs(got - expected).max() / np.abs(expected).max())
  size = os.path.getsize(path) / 2**20
  print(f"| {source} | {arch} | {fmt} | {images.shape[1]} | {size:.0f} MiB | {seconds:.1f} s | "
        f"{error:.1e} |", flush=True)


def keras_rows(names, directory, rng):
  import h5py  # pylint: disable=import-outside-toplevel
  import keras  # pylint: disable=import-outside-toplevel
  from keras.src.legacy.saving import legacy_h5_format  # pylint: disable=import-outside-toplevel
  from tests.test_weights_keras import randomize  # pylint: disable=import-outside-toplevel

  for name in names:
    ctor, module, size = KERAS[name]
    model = getattr(keras.applications, ctor)(weights=None, include_top=False,
                                              input_shape=(size, size, 3))
    randomize(model, seed=0)
    path = os.path.join(directory, f"{name}_notop.h5")
    with h5py.File(path, "w") as f:
      legacy_h5_format.save_weights_to_hdf5_group(f, model)
    preprocess = getattr(keras.applications, module).preprocess_input
    images = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    _row("keras", name, "h5", path, directory,
         lambda x: np.asarray(model.predict(preprocess(x.astype(np.float32)), verbose=0)),
         images)


def torch_rows(names, directory, rng):
  import torch  # pylint: disable=import-outside-toplevel
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  from tests import torch_reference  # pylint: disable=import-outside-toplevel

  for name in names:
    model = torch_reference.randomize_(torch_reference.REFERENCES[name](), seed=0)
    spec = weights.PREPROCESSING["torch" if name.startswith("resnet") else "tf"]
    mean = torch.tensor(spec["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(spec["std"]).view(1, 3, 1, 1)

    def reference(x, model=model, mean=mean, std=std):
      x = (torch.from_numpy(x).permute(0, 3, 1, 2).float() - mean) / std
      with torch.no_grad():
        return model.forward_features(x).permute(0, 2, 3, 1).numpy()

    size = TORCH[name]
    images = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    for fmt in ("safetensors", "pth"):
      path = os.path.join(directory, f"{name}.{fmt}")
      save_file(state, path) if fmt == "safetensors" else torch.save(state, path)
      _row("torch", name, fmt, path, directory, reference, images)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  default = [f"keras:{a}" for a in KERAS] + [f"torch:{a}" for a in TORCH]
  parser.add_argument("--archs", default=",".join(default), help="source:arch list")
  args = parser.parse_args()
  chosen = [a.split(":") for a in args.archs.split(",")]
  rng = np.random.default_rng(0)
  print("| source | arch | format | input px | file | convert | max rel. diff |")
  print("|---|---|---|---|---|---|---|")
  with tempfile.TemporaryDirectory() as directory:
    keras_rows([a for s, a in chosen if s == "keras"], directory, rng)
    torch_rows([a for s, a in chosen if s == "torch"], directory, rng)


if __name__ == "__main__":
  main()
