"""Exported models (jaxseg.export, experiments.export): StableHLO that runs with jax and numpy
only, in a process where importing flax or jaxseg fails, and gives what load_run gives."""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxseg import evaluate, export, runs
from jaxseg.errors import JaxsegError
from jaxseg.inference import TTA
from jaxseg.models import create_model
from jaxseg.train import segmentation
from jaxseg.train.workdir import Classes
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Run before the docs snippet: importing flax or jaxseg (or anything under them) fails.
_BLOCK = '''
import sys
class _Blocked:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("flax", "jaxseg"):
      raise ImportError(f"{name} may not be imported here")
sys.meta_path.insert(0, _Blocked())
'''


def _snippet(export_dir, images_path, out_path, section="Running it with jax and numpy only"):
  """docs/export.md's snippet, reading `export_dir` and the test's images, saving its outputs."""
  text = (ROOT / "docs" / "export.md").read_text()
  code = re.search(rf"## {section}.*?```python\n(.*?)```", text, re.S).group(1)
  code = re.sub(r"exported/deeplab\w*", str(export_dir), code)
  code = re.sub(r"images = .*\n", f"images = np.load({str(images_path)!r})\n", code)
  return (_BLOCK + code + f"np.savez({str(out_path)!r}, probabilities=np.asarray(probabilities), "
          "labels=np.asarray(labels))\n")


def _run_outside(export_dir, images, tmp_path, **section):
  np.save(tmp_path / "images.npy", images)
  out = tmp_path / "outputs.npz"
  result = subprocess.run([sys.executable, "-c", _snippet(export_dir, tmp_path / "images.npy",
                                                          out, **section)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(out) as outputs:
    return outputs["probabilities"], outputs["labels"]


@pytest.fixture(scope="module")
def deeplab_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("deeplab"))
  segmentation.train_and_evaluate(helpers.tiny_config(steps=2), workdir)
  return workdir


def test_the_docs_snippet_runs_without_jaxseg_and_equals_load_run(deeplab_run, tmp_path):
  run = runs.load_run(deeplab_run)
  meta = export.export(run, str(tmp_path / "export"))
  assert meta["input"] == {**meta["input"], "channels": 3, "dtype": "uint8", "min_size": 289}
  assert meta["class_names"] == list(run.classes.names)
  images = np.random.default_rng(0).integers(0, 256, (2, 320, 352, 3), dtype=np.uint8)
  probabilities, labels = _run_outside(tmp_path / "export", images, tmp_path)
  assert probabilities.shape == (2, 320, 352, 5) and probabilities.dtype == np.float32
  assert labels.shape == (2, 320, 352) and labels.dtype == np.int32
  expected = np.asarray(run.probabilities(images))
  np.testing.assert_allclose(probabilities, expected, atol=1e-5)
  np.testing.assert_array_equal(labels, expected.argmax(-1))


def test_sizes_the_stride_does_not_divide_are_padded_and_cropped(deeplab_run, tmp_path):
  run = runs.load_run(deeplab_run)
  export.export(run, str(tmp_path / "export"))
  exported, meta = export.load(str(tmp_path / "export"))
  assert meta["input"]["pad_to_multiple_of"] == 32
  images = np.random.default_rng(1).integers(0, 256, (1, 300, 333, 3), dtype=np.uint8)
  probabilities, labels = map(np.asarray, exported.call(images))
  assert probabilities.shape == (1, 300, 333, 5)
  # The same padding in jaxseg: normalise, pad with zeros to 320x352, run, crop.
  x = np.asarray(run.preprocess(images))
  padded = np.pad(x, ((0, 0), (0, 20), (0, 19), (0, 0)))
  logits = np.asarray(run.model.apply(run.variables, padded, train=False))[:, :300, :333]
  expected = np.exp(logits - logits.max(-1, keepdims=True))
  expected /= expected.sum(-1, keepdims=True)
  np.testing.assert_allclose(probabilities, expected, atol=1e-5)
  np.testing.assert_array_equal(labels, expected.argmax(-1))
  with pytest.raises(Exception, match="Error refining shapes"):  # DeepLab's size rule
    exported.call(images[:, :200, :200])


def test_a_flipped_ensemble_exports_as_one_function(deeplab_run, tmp_path):
  run = runs.load_run(deeplab_run)
  ensemble = evaluate.Ensemble([run, run], [2.0, 1.0])
  meta = export.export(ensemble, str(tmp_path / "export"), tta=TTA(flip=True))
  assert meta["tta"] == "scales 1 + flip" and len(meta["members"]) == 2
  exported, _ = export.load(str(tmp_path / "export"))
  images = np.random.default_rng(2).integers(0, 256, (1, 320, 320, 3), dtype=np.uint8)
  got = np.asarray(exported.call(images)[0])
  expected = np.asarray(ensemble.probabilities(images, tta=TTA(flip=True)))
  np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("unet"))
  segmentation.train_and_evaluate(helpers.tiny_unet_config(), workdir)
  return workdir


def test_the_command_line_exports_a_unet_that_takes_any_size(unet_run, tmp_path):
  out = tmp_path / "unet"
  result = subprocess.run([sys.executable, "-m", "experiments.export", f"--workdir={unet_run}",
                           f"--out={out}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "wrote model.stablehlo and model.json" in result.stdout
  meta = json.loads((out / "model.json").read_text())
  assert meta["input"]["min_size"] == 1 and meta["members"][0]["workdir"] == unet_run
  assert sorted(os.listdir(out)) == ["model.json", "model.stablehlo"]  # no temporary left
  run = runs.load_run(unet_run)
  for shape in ((3, 64, 96, 3), (1, 32, 32, 3)):
    images = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    probabilities, labels = _run_outside(out, images, tmp_path)
    np.testing.assert_allclose(probabilities, np.asarray(run.probabilities(images)), atol=1e-5)


def test_bad_exports_are_one_line(unet_run, tmp_path):
  run = runs.load_run(unet_run)
  with pytest.raises(JaxsegError, match=r"--format=onnnx: valid formats are stablehlo"):
    export.export(run, str(tmp_path / "a"), formats=["onnnx"])
  with pytest.raises(JaxsegError, match=r"--out=.*missing/deeper: its folder .*missing does not "
                                        r"exist"):
    export.export(run, str(tmp_path / "missing" / "deeper"))
  with pytest.raises(JaxsegError, match=r"--scales=0.5,1.0: model.stablehlo takes any image "
                                        r"size, .*export the scales to ONNX alone"):
    export.export(run, str(tmp_path / "b"), tta=TTA((0.5, 1.0)))
  with pytest.raises(JaxsegError, match="no checkpoint"):
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(
        (pathlib.Path(unet_run) / "config.json").read_text())
    runs.load_run(str(tmp_path / "empty"))
  graph_run = runs.GraphRun(config=None, model=None, params=None, superpixels=object(),
                            num_classes=2, step=0, classes=None)
  with pytest.raises(JaxsegError, match="the superpixel GNN cannot be exported"):
    export.serving_function(graph_run)


def test_a_truncated_export_is_one_line(unet_run, tmp_path):
  export.export(runs.load_run(unet_run), str(tmp_path))
  blob = (tmp_path / export.STABLEHLO_FILE).read_bytes()
  (tmp_path / export.STABLEHLO_FILE).write_bytes(blob[:len(blob) // 2])
  with pytest.raises(JaxsegError, match=r"model\.stablehlo: not a serialised jax\.export module"):
    export.load(str(tmp_path))
  (tmp_path / export.METADATA_FILE).write_text("{")
  with pytest.raises(JaxsegError, match=r"model\.json: not readable JSON"):
    export.load(str(tmp_path))


# --- ONNX -----------------------------------------------------------------------------------

ONNX_DOCS = {"section": "Running it with onnxruntime"}


def _family_run(name, **kw):
  """An untrained run of model family `name` whose BatchNorm statistics are not the identity
  (so that a converter that drops them, or their epsilon, shows)."""
  model = create_model(name, num_classes=4, **kw)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
  rng = np.random.default_rng(0)

  def perturb(path, leaf):
    key = jax.tree_util.keystr(path)
    if "batch_stats" in key and key.endswith("['mean']"):
      return jnp.asarray(rng.normal(0, 0.2, leaf.shape), jnp.float32)
    if "batch_stats" in key and key.endswith("['var']"):
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
    return leaf

  variables = jax.tree_util.tree_map_with_path(perturb, variables)
  config = ml_collections.ConfigDict({"model": {"name": name, "backbone": kw.get("backbone")},
                                      "data": {"name": "folder", "crop_size": None}})
  palette = np.arange(12, dtype=np.uint8).reshape(4, 3)
  return runs.Run(config, model, variables, runs.make_preprocess("imagenet"), 4, 0,
                  Classes(("a", "b", "c", "d"), palette))


@pytest.mark.parametrize("name, kw", [
    ("deeplabv3plus", {"backbone": "xception", "aspp_features": 32, "decoder_features": 32}),
    ("deeplabv3plus", {"backbone": "tiny_resnet", "aspp_features": 16,
                       "decoder_features": 16, "low_level_features": 8}),
    ("unet", {"features": 4, "depth": 3}),
    ("attention_unet", {"features": 4, "depth": 3}),
    ("resnet50_unet", {"backbone": "tiny_resnet", "decoder_features": (16, 16, 8, 8, 8)}),
], ids=["deeplab_xception", "deeplab_resnet", "unet", "attention_unet", "resnet_unet"])
def test_onnx_matches_jaxseg_for_every_model_family(name, kw, tmp_path):
  helpers.register_tiny_backbone()
  run = _family_run(name, **kw)
  meta = export.export(run, str(tmp_path), formats=["onnx"], size=(64, 96))
  assert meta["onnx"] == {"file": "model.onnx", "opset": export.ONNX_OPSET,
                          "input_shape": ["B", 64, 96, 3], "size_rule": meta["onnx"]["size_rule"]}
  session = export.onnx_session(str(tmp_path))
  assert [(i.name, i.shape, i.type) for i in session.get_inputs()] == [
      ("images", ["B", 64, 96, 3], "tensor(uint8)")]
  assert [(o.name, o.type) for o in session.get_outputs()] == [
      ("probabilities", "tensor(float)"), ("labels", "tensor(int32)")]
  images = np.random.default_rng(4).integers(0, 256, (3, 64, 96, 3), dtype=np.uint8)
  probabilities, labels = session.run(None, {"images": images})
  expected = np.asarray(run.probabilities(images))
  assert probabilities.shape == (3, 64, 96, 4) and labels.shape == (3, 64, 96)
  np.testing.assert_allclose(probabilities, expected, atol=1e-4)
  assert np.mean(labels == expected.argmax(-1)) >= 0.9999
  assert len(np.unique(labels)) > 1  # the comparison saw a real decision, not one class
  assert sorted(os.listdir(tmp_path)) == ["model.json", "model.onnx"]  # one file, no .data


def test_the_onnx_docs_snippet_runs_without_jaxseg_and_equals_load_run(unet_run, tmp_path):
  out = tmp_path / "unet"
  result = subprocess.run([sys.executable, "-m", "experiments.export", f"--workdir={unet_run}",
                           "--format=stablehlo,onnx", f"--out={out}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "wrote model.stablehlo, model.onnx and model.json" in result.stdout
  assert "DEBUG" not in result.stdout  # jax2onnx's prints stay inside the export
  meta = json.loads((out / "model.json").read_text())
  assert meta["onnx"]["input_shape"] == ["B", 32, 32, 3]  # the run's training size
  run = runs.load_run(unet_run)
  images = np.random.default_rng(5).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
  probabilities, labels = _run_outside(out, images, tmp_path, **ONNX_DOCS)
  expected = np.asarray(run.probabilities(images))
  np.testing.assert_allclose(probabilities, expected, atol=1e-4)
  assert np.mean(labels == expected.argmax(-1)) >= 0.9999


def test_an_ensemble_with_multi_scale_tta_exports_to_onnx_as_one_function(unet_run, tmp_path):
  """At a fixed size every TTA view has an exact size: ONNX takes --tta's scales too."""
  run = runs.load_run(unet_run)
  ensemble = evaluate.Ensemble([run, run], [1.0, 3.0])
  tta = TTA((0.75, 1.0, 1.5), flip=True)
  meta = export.export(ensemble, str(tmp_path), formats=["onnx"], tta=tta, size=(40, 24))
  assert meta["tta"] == "scales 0.75, 1, 1.5 + flip"
  images = np.random.default_rng(6).integers(0, 256, (2, 40, 24, 3), dtype=np.uint8)
  probabilities, _ = export.onnx_session(str(tmp_path)).run(None, {"images": images})
  np.testing.assert_allclose(probabilities, np.asarray(ensemble.probabilities(images, tta=tta)),
                             atol=1e-4)


def test_bad_onnx_exports_are_one_line_and_write_nothing(unet_run, tmp_path, monkeypatch):
  run = runs.load_run(unet_run)
  monkeypatch.setitem(sys.modules, "jax2onnx", None)  # the export extra not installed
  with pytest.raises(JaxsegError, match=r"^--format=onnx needs jax2onnx, onnx and onnxruntime: "
                                        r"pip install 'jaxseg\[export\]'$"):
    export.export(run, str(tmp_path / "a"), formats=["stablehlo", "onnx"])
  assert not (tmp_path / "a").exists()
  monkeypatch.undo()
  with pytest.raises(JaxsegError, match=r"^--size=0x32: give HxW, two positive numbers$"):
    export.export(run, str(tmp_path / "b"), formats=["onnx"], size=(0, 32))
  # A folder dataset's run that records no training size (it is in summary.json).
  with pytest.raises(JaxsegError, match=r"this run records no training size; give --size=HxW"):
    export.export(_family_run("unet", features=4, depth=2), str(tmp_path / "c"),
                  formats=["onnx"])
  result = subprocess.run([sys.executable, "-m", "experiments.export", f"--workdir={unet_run}",
                           "--format=onnx", "--size=big", f"--out={tmp_path / 'd'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode != 0 and result.stderr.strip().splitlines()[-1] == (
      "error: --size=big: give HxW, e.g. 512x512")
  assert not (tmp_path / "d").exists()


def test_a_corrupt_onnx_file_is_one_line(unet_run, tmp_path):
  with pytest.raises(JaxsegError, match=r"model\.onnx: no such file \(python -m "
                                        r"experiments\.export --format=onnx writes it\)"):
    export.onnx_session(str(tmp_path))
  export.export(runs.load_run(unet_run), str(tmp_path), formats=["onnx"])
  blob = (tmp_path / export.ONNX_FILE).read_bytes()
  (tmp_path / export.ONNX_FILE).write_bytes(blob[:len(blob) // 3])
  with pytest.raises(JaxsegError, match=r"model\.onnx: not an ONNX model onnxruntime can load "
                                        r"\(corrupt or truncated"):
    export.onnx_session(str(tmp_path))


def test_an_export_to_a_read_only_folder_is_one_line(unet_run, tmp_path):
  run = runs.load_run(unet_run)
  with helpers.tmpfs(tmp_path / "disk", "4m") as disk:
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    with pytest.raises(JaxsegError, match=rf"^--out={disk / 'out'} is not writable: read-only "
                                          r"file system"):
      export.export(run, str(disk / "out"), formats=["stablehlo", "onnx"])
