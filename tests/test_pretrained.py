"""--config.model.pretrained: the backbone subtree restored into a fresh model, its
preprocessing applied, a frozen start, and one-line errors for anything that does not match."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxseg import weights
from jaxseg.errors import JaxsegError
from jaxseg.train import segmentation
from jaxseg.weights import store
from tests import helpers


def _save_backbone(directory, width=8, drop=None, preprocessing="caffe", backbone=None):
  """A pretrained checkpoint of the tiny test ResNet with random weights and BN statistics."""
  module = helpers.TINY_RESNET(width=width)
  variables = jax.jit(module.init, static_argnames="train")(
      jax.random.key(7), jnp.zeros((1, 32, 32, 3)), train=False)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda x: rng.uniform(0.5, 1.5, x.shape).astype(np.float32),
                           variables)
  if drop:
    del variables["params"]["stage2"]["block0"][drop]
  store.save_pretrained(str(directory), variables, {
      "source": "torch", "arch": "tiny", "backbone": backbone or helpers.register_tiny_backbone(),
      "backbone_kwargs": {}, "preprocessing": weights.PREPROCESSING[preprocessing],
      "preprocessing_name": preprocessing, "input_file": "tiny.pth", "input_sha256": "0" * 64})
  return variables


def _final_state(workdir, step):
  return ocp.StandardCheckpointer().restore(pathlib.Path(workdir) / "checkpoints" / str(step) /
                                            "state")


def test_backbone_restored_held_still_while_frozen_and_preprocessing_used(tmp_path):
  pretrained = _save_backbone(tmp_path / "pretrained", preprocessing="caffe")
  config = helpers.tiny_config(steps=2, **{"optim.freeze_backbone_steps": 1,
                                           "train.checkpoint_every": 1})
  config.model.pretrained = str(tmp_path / "pretrained")
  segmentation.train_and_evaluate(config, str(tmp_path / "run"))

  def backbone_equals_pretrained(step):
    state = _final_state(tmp_path / "run", step)
    return jax.tree.leaves(jax.tree.map(np.array_equal, pretrained, {
        "params": state["params"]["backbone"], "batch_stats": state["batch_stats"]["backbone"]}))

  # Frozen for step 1: every backbone value, BN statistics included, is exactly the pretrained
  # one (random values no initialiser makes); step 2 trains the backbone and moves all of them.
  assert all(backbone_equals_pretrained(1))
  assert not any(backbone_equals_pretrained(2))
  head = _final_state(tmp_path / "run", 1)["batch_stats"]["aspp"]["project"]["bn"]["mean"]
  assert np.abs(head).max() > 0  # the head trained during the freeze
  # The run normalised its inputs as the checkpoint says (Keras "caffe": BGR, mean subtracted).
  identity = ocp.JsonCheckpointHandler().restore(tmp_path / "run" / "checkpoints" / "2" /
                                                 "identity")
  assert identity["preprocessing"] == weights.PREPROCESSING["caffe"]
  images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
  expected = images[..., ::-1].astype(np.float32) - np.array([103.939, 116.779, 123.68])
  np.testing.assert_allclose(weights.make_preprocess(identity["preprocessing"])(images),
                             expected, atol=1e-4)


@pytest.mark.parametrize("case, message", [
    ("shape", "params backbone/stage1/block0/conv1/bn/bias has shape (16,) in the checkpoint but "
              "(8,) in the model"),
    ("missing", "params backbone/stage2/block0/downsample/bn/bias (64,) of the model is missing "
                "from the checkpoint"),
    ("backbone", "holds a torch tiny backbone (jaxseg resnet50) but the model's backbone is "
                 "tiny_resnet; run with --backbone=resnet50"),
])
def test_mismatch_is_one_line_naming_the_first_path(tmp_path, case, message):
  _save_backbone(tmp_path / "pretrained", width=16 if case == "shape" else 8,
                 drop="downsample" if case == "missing" else None,
                 backbone="resnet50" if case == "backbone" else None)
  config = helpers.tiny_config(steps=1)
  config.model.pretrained = str(tmp_path / "pretrained")
  with pytest.raises(JaxsegError) as err:
    segmentation.train_and_evaluate(config, str(tmp_path / "run"))
  assert str(err.value) == f"--config.model.pretrained={tmp_path / 'pretrained'}: {message}" or (
      case == "backbone" and message in str(err.value))
  assert not (tmp_path / "run" / "checkpoints").exists() or not any(
      (tmp_path / "run" / "checkpoints").iterdir())
