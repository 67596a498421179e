"""A finished (or checkpointed) segmentation run as a model to run: `load_run(workdir)`.

A run directory holds `config.json` (written by the training loop) and Orbax checkpoints; the
model is rebuilt from the config and its latest checkpoint restored, checked against the
model's parameter shapes, with the input preprocessing it was trained with.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import ml_collections

from jaxseg import weights
from jaxseg.data.preprocess import make_normalize
from jaxseg.errors import JaxsegError
from jaxseg.models import create_model
from jaxseg.train import sharding
from jaxseg.train.checkpoint import Checkpointer, param_shapes


@dataclasses.dataclass
class Run:
  """A trained model: `logits(images uint8 (B, H, W, 3)) -> float32 (B, H, W, K)` (jitted)."""
  config: ml_collections.ConfigDict
  model: Any
  variables: dict
  preprocess: Callable
  num_classes: int
  step: int

  def __post_init__(self):
    # Compiled once per run (jit caches by the function object).
    model, preprocess = self.model, self.preprocess
    self._logits = jax.jit(lambda variables, images: model.apply(
        variables, preprocess(images), train=False).astype("float32"))

  def logits(self, images):
    return self._logits(self.variables, images)

  def probabilities(self, images):
    return jax.nn.softmax(self.logits(images), axis=-1)


def load_run(workdir: str, flag: str = "workdir") -> Run:
  """The model of run `workdir` with its latest checkpoint; one-line errors name `--flag`."""
  from jaxseg.train import segmentation  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise JaxsegError(f"--{flag}={workdir}: no config.json there (is it the workdir of a "
                      "segmentation run?)")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), {}, async_save=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise JaxsegError(f"--{flag}={workdir}: no checkpoint in {ckpt.directory}")
    identity = ckpt.saved_identity(step)
    num_classes = identity["num_classes"]
    dtype = segmentation.compute_dtype(config.model.dtype)
    model = create_model(config.model.name, num_classes=num_classes,
                         backbone=config.model.get("backbone"), dtype=dtype,
                         **segmentation.model_kwargs(config))
    state, _, _ = segmentation.create_train_state(config, model, sharding.make_mesh(),
                                                  (64, 64, 3), config.train.steps)
    ckpt.identity = {**identity, "params": param_shapes(state.params)}
    state = ckpt.restore_state(step, state)
  finally:
    ckpt.close()
  spec = identity.get("preprocessing", "imagenet")
  preprocess = make_normalize() if spec == "imagenet" else weights.make_preprocess(spec)
  return Run(config, model, {"params": state.params, "batch_stats": state.batch_stats},
             preprocess, num_classes, step)

