"""ImageNet backbones from Keras and PyTorch files, as Orbax checkpoints.

    python -m jaxseg.weights.convert --source=keras --arch=xception xception_notop.h5 out/
    module, variables, preprocess = jaxseg.weights.load_backbone("out/")
    features = module.apply(variables, preprocess(images_uint8), train=False)

Training uses one with `--config.model.pretrained=out/`.
"""

from jaxseg.weights.archs import ARCHS, PREPROCESSING
from jaxseg.weights.channels import adapt_first_conv, adapt_input_channels
from jaxseg.weights.converter import convert_file
from jaxseg.weights.store import load_backbone, load_pretrained, make_preprocess, read_metadata

__all__ = ["ARCHS", "PREPROCESSING", "adapt_first_conv", "adapt_input_channels", "convert_file", "load_backbone", "load_pretrained",
           "make_preprocess", "read_metadata"]
