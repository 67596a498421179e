"""Converts an ImageNet backbone from a Keras or PyTorch file into a jaxseg Orbax checkpoint.

    python -m jaxseg.weights.convert --source=keras --arch=resnet50 \
        resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 pretrained/keras_resnet50
    python -m jaxseg.weights.convert --source=torch --arch=xception65 model.safetensors out/

Then train with `--config.model.pretrained=OUTPUT_DIR`, or in Python:
`module, variables, preprocess = jaxseg.weights.load_backbone(OUTPUT_DIR)`.
"""

from __future__ import annotations

import argparse
import sys

from jaxseg.errors import JaxsegError
from jaxseg.weights.archs import ARCHS
from jaxseg.weights.converter import convert_file


def main(argv=None) -> int:
  archs = ", ".join(f"{s}:{a}" for s, a in ARCHS)
  parser = argparse.ArgumentParser(
      prog="python -m jaxseg.weights.convert", description=__doc__.splitlines()[0],
      epilog=f"Source:arch pairs: {archs}.")
  parser.add_argument("--source", required=True, choices=sorted({s for s, _ in ARCHS}))
  parser.add_argument("--arch", required=True, help="network in the file, e.g. resnet50")
  parser.add_argument("input", help="weights file (.h5/.weights.h5/.keras or "
                                    ".safetensors/.pth/.pt)")
  parser.add_argument("output_dir", help="new directory for the Orbax checkpoint")
  args = parser.parse_args(argv)
  try:
    convert_file(args.source, args.arch, args.input, args.output_dir, log=print)
  except JaxsegError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
