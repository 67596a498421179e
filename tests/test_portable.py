"""The portable model file (jaxseg.save_pretrained / load_pretrained, experiments.export
--format=safetensors) and starting a run from it (--config.model.init_from)."""

import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

import jaxseg
from jaxseg import export, runs
from jaxseg.errors import JaxsegError
from jaxseg.train import model_file, segmentation
from tests import helpers


def _config(steps=2, **model):
  config = helpers.tiny_unet_config(steps, **model)
  config.train.ema_decay = 0.9  # the file holds the weights the run is used with: the average
  return config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("unet"))
  segmentation.train_and_evaluate(_config(), workdir)
  run = runs.load_run(workdir)
  path = str(tmp_path_factory.mktemp("file") / "unet.safetensors")
  jaxseg.save_pretrained(run, path)
  return run, path


def test_a_saved_model_loads_as_the_same_model(saved):
  run, path = saved
  loaded = jaxseg.load_pretrained(path)
  assert (loaded.name, loaded.num_classes, loaded.classes.names) == (
      run.name, run.num_classes, run.classes.names)
  assert (loaded.step, loaded.weights_source, loaded.in_channels) == (2, "ema", 3)
  images = np.random.default_rng(0).integers(0, 256, (2, 40, 56, 3), dtype=np.uint8)
  np.testing.assert_array_equal(np.asarray(loaded.probabilities(images)),
                                np.asarray(run.probabilities(images)))
  # Plain safetensors: any reader sees the weights by path.
  tensors = load_file(path)
  assert "params/classifier/kernel" in tensors and "batch_stats" in {k.split("/")[0] for k in tensors}
  assert not any(k.startswith("ema") for k in tensors)


def test_the_docs_example_runs(saved):
  import pathlib  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  _, path = saved
  text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "export.md").read_text()
  code = re.search(r"## One portable model file.*?```python\n(.*?)```", text, re.S).group(1)
  scope = {}
  exec(code.replace("exported/deeplab_file/model.safetensors", path), scope)  # pylint: disable=exec-used
  assert scope["probabilities"].shape == (1, 64, 64, 5)


def test_bad_model_files_are_one_line(saved, tmp_path):
  _, path = saved
  blob = open(path, "rb").read()
  (tmp_path / "cut.safetensors").write_bytes(blob[:len(blob) // 2])
  (tmp_path / "text.safetensors").write_text("hello")
  save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "other.safetensors"))
  tensors = load_file(path)
  with open(path, "rb") as f:
    header = json.loads(f.read(8 + int.from_bytes(blob[:8], "little"))[8:])
  future = {**header["__metadata__"], "format_version": "99"}
  save_file(tensors, str(tmp_path / "future.safetensors"), metadata=future)
  wrong = {**header["__metadata__"], "num_classes": "3"}
  save_file(tensors, str(tmp_path / "wrong.safetensors"), metadata=wrong)
  cases = {"missing.safetensors": "no such model file",
           "cut.safetensors": "not a readable safetensors file",
           "text.safetensors": "not a readable safetensors file",
           "other.safetensors": "not a jaxseg model file",
           "future.safetensors": "jaxseg model format version 99, this jaxseg reads version 1",
           "wrong.safetensors": r"params/classifier/bias is \(5,\) in the file but \(3,\) in unet"}
  for name, message in cases.items():
    with pytest.raises(JaxsegError, match=message) as error:
      jaxseg.load_pretrained(str(tmp_path / name))
    assert "\n" not in str(error.value), name


def test_export_writes_the_model_file_too(saved, tmp_path):
  run, _ = saved
  meta = export.export(run, str(tmp_path), formats=["safetensors"])
  assert meta["files"] == {"safetensors": "model.safetensors"}
  assert sorted(os.listdir(tmp_path)) == ["model.json", "model.safetensors"]
  loaded = jaxseg.load_pretrained(str(tmp_path / "model.safetensors"))
  images = np.zeros((1, 32, 32, 3), np.uint8)
  np.testing.assert_array_equal(np.asarray(loaded.probabilities(images)),
                                np.asarray(run.probabilities(images)))


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def test_init_from_starts_from_every_weight(saved, tmp_path):
  run, path = saved
  config = _config(steps=1, init_from=path)
  workdir = str(tmp_path / "again")
  summary = segmentation.train_and_evaluate(config, workdir)
  assert summary["init_from"] == path
  # One step from the file's weights: close to them, not to a fresh initialisation.
  after = _flat(runs.load_run(workdir, weights="raw").variables["params"])
  start = _flat(run.variables["params"])
  moved = max(float(np.abs(after[k] - start[k]).max()) for k in start)
  assert moved < 0.05


def test_init_from_another_class_count_restarts_the_classifier_only(saved):
  _, path = saved
  from jaxseg.train import build  # pylint: disable=g-import-not-at-top
  from jaxseg.train import sharding  # pylint: disable=g-import-not-at-top
  config = _config()
  model = build.segmentation_model(config, 3)
  state, _ = segmentation.create_train_state(config, model, sharding.make_mesh(), (32, 32, 3))
  started, fresh = model_file.initial_state(state, path)
  assert fresh and all(k.startswith("params/") for k in fresh)
  tensors = load_file(path)
  new, old = _flat(started.params), _flat(state.params)
  for key, value in new.items():
    if f"params/{key}" in fresh:
      np.testing.assert_array_equal(value, old[key])  # kept its fresh initialisation
      assert value.shape[-1] == 3
    else:
      np.testing.assert_array_equal(value, tensors[f"params/{key}"])
  wider = build.segmentation_model(_config(features=8), 5)
  state, _ = segmentation.create_train_state(_config(features=8), wider, sharding.make_mesh(),
                                             (32, 32, 3))
  with pytest.raises(JaxsegError, match=r"--config.model.init_from=.*: params/.* is \(.*\) in "
                                        r"the file but \(.*\) in this run's model"):
    model_file.initial_state(state, path)
