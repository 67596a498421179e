"""jaxseg: semantic segmentation in JAX/Flax.

    from jaxseg import models, losses, metrics
    model = models.create_model("deeplabv3plus", num_classes=19, backbone="resnet101")

Training: `jaxseg.train.segmentation.train_and_evaluate(config, workdir)`.
"""

from jaxseg import runtime

# Before anything can start a backend: XLA reads XLA_FLAGS once, then (jaxseg/runtime.py).
runtime.use_fast_cpu_kernels()

# pylint: disable=wrong-import-position
from jaxseg import backbones, data, losses, metrics, models, weights
from jaxseg.errors import JaxsegError
from jaxseg.models import create_model
from jaxseg.portable import load_pretrained, save_pretrained
from jaxseg.version import __version__


__all__ = ["backbones", "data", "losses", "metrics", "models", "weights", "create_model",
           "JaxsegError", "load_pretrained", "save_pretrained",
           "__version__"]
