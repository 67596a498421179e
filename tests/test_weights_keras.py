"""Keras -> jaxseg parity: keras.applications models (Keras 3, JAX backend) with random weights
and BatchNorm statistics, saved in each Keras format, converted, and compared feature by
feature with Keras's own forward pass."""

import os
import subprocess
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

import h5py  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

keras = pytest.importorskip("keras")

from jaxseg import weights  # noqa: E402
from jaxseg.errors import JaxsegError  # noqa: E402

# Keras's JAX backend converts arrays with np.array(x, copy=False) semantics numpy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# name -> (constructor, preprocess_input, input size). Xception needs at least 71 pixels,
# Inception-v3 75.
MODELS = {
    "resnet50": ("ResNet50", "resnet", 64),
    "resnet101": ("ResNet101", "resnet", 64),
    "xception": ("Xception", "xception", 80),
    "inception_v3": ("InceptionV3", "inception_v3", 75),
}


def randomize(model, seed):
  """He-scaled random kernels, random biases and BatchNorm statistics (nothing at defaults)."""
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    values = []
    for w in layer.weights:
      shape, name = tuple(w.shape), w.path.split("/")[-1]
      if name in ("kernel", "depthwise_kernel", "pointwise_kernel"):
        fan_in = np.prod(shape[:2]) * (1 if name == "depthwise_kernel" else shape[2])
        values.append(rng.normal(0, np.sqrt(2.0 / fan_in), shape))
      elif name in ("gamma", "moving_variance"):
        values.append(rng.uniform(0.5, 1.5, shape))
      else:  # bias, beta, moving_mean
        values.append(rng.normal(0, 0.2, shape))
    if values:
      layer.set_weights([v.astype(np.float32) for v in values])


_BUILT = {}


def _build(name, tmp_path_factory):
  """(arch, {format: path}, uint8 images, Keras's final features, Keras's value count)."""
  if name in _BUILT:
    return _BUILT[name]
  ctor, module, size = MODELS[name]
  keras.layers.Conv2D(1, 1)  # shifts Keras's auto-numbering (conv2d_1, ...) as in real files
  model = getattr(keras.applications, ctor)(weights=None, include_top=False,
                                            input_shape=(size, size, 3))
  randomize(model, seed=len(name))
  directory = tmp_path_factory.mktemp(name)
  paths = {"weights.h5": str(directory / f"{name}.weights.h5"),
           "legacy.h5": str(directory / f"{name}_notop.h5"),
           "keras": str(directory / f"{name}.keras")}
  model.save_weights(paths["weights.h5"])
  model.save(paths["keras"])
  # The layout of the keras.applications ImageNet downloads (Keras 2 save_weights).
  from keras.src.legacy.saving import legacy_h5_format
  with h5py.File(paths["legacy.h5"], "w") as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, model)
  images = np.random.default_rng(1).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
  preprocess = getattr(keras.applications, module).preprocess_input
  reference = np.asarray(model.predict(preprocess(images.astype(np.float32)), verbose=0))
  _BUILT[name] = name, paths, images, reference, model.count_params(), model
  return _BUILT[name]


@pytest.fixture(scope="module", params=sorted(MODELS))
def keras_reference(request, tmp_path_factory):
  return _build(request.param, tmp_path_factory)[:4]


@pytest.fixture(scope="module")
def resnet50_reference(tmp_path_factory):
  return _build("resnet50", tmp_path_factory)[:4]


def _max_relative_error(a, b):
  return float(np.abs(a - b).max() / np.abs(b).max())


def test_converted_backbone_matches_keras_features(keras_reference, tmp_path):
  name, paths, images, reference = keras_reference
  keras_values = _BUILT[name][4]
  out = tmp_path / "converted"
  lines = []
  meta = weights.convert_file("keras", name, paths["weights.h5"], str(out), log=lines.append)
  assert meta["backbone"] == name
  assert lines[-1].startswith("mapped ") and "ignored 0" in lines[-1]
  module, variables, preprocess = weights.load_backbone(str(out))
  features = module.apply(variables, preprocess(images), train=False)
  assert features["stage4"].shape == reference.shape
  assert _max_relative_error(np.asarray(features["stage4"]), reference) <= 1e-4
  # Every value of the Keras model (weights + BN statistics) landed in the jaxseg variables.
  assert sum(x.size for x in jax.tree.leaves(variables)) == keras_values


@pytest.fixture(scope="module", params=["resnet50", "xception"])
def reader_reference(request, tmp_path_factory):
  """The Keras readers do not depend on depth: ResNet-101 adds nothing here but time."""
  return _build(request.param, tmp_path_factory)[:4]


@pytest.mark.parametrize("fmt", ["legacy.h5", "keras"])
def test_every_keras_format_gives_the_same_variables(reader_reference, tmp_path, fmt):
  name, paths, _, _ = reader_reference
  weights.convert_file("keras", name, paths["weights.h5"], str(tmp_path / "a"))
  weights.convert_file("keras", name, paths[fmt], str(tmp_path / "b"))
  a, _ = weights.load_pretrained(str(tmp_path / "a"))
  b, _ = weights.load_pretrained(str(tmp_path / "b"))
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_metadata_records_source_and_preprocessing(keras_reference, tmp_path):
  name, paths, _, _ = keras_reference
  meta = weights.convert_file("keras", name, paths["legacy.h5"], str(tmp_path / "out"))
  assert weights.read_metadata(str(tmp_path / "out")) == meta
  if name in ("xception", "inception_v3"):  # scale to [-1, 1]
    assert meta["preprocessing"] == {"channels": "RGB", "mean": [127.5] * 3, "std": [127.5] * 3}
  else:  # caffe: BGR, ImageNet mean subtracted, no scaling
    assert meta["preprocessing"]["channels"] == "BGR"
    assert meta["preprocessing"]["mean"] == [103.939, 116.779, 123.68]
  assert meta["source"] == "keras" and meta["arch"] == name
  assert meta["input_file"] == os.path.basename(paths["legacy.h5"])


def test_wrong_arch_names_file_and_first_missing_key(keras_reference, tmp_path):
  name, paths, _, _ = keras_reference
  wrong = "xception" if name != "xception" else "resnet50"
  with pytest.raises(JaxsegError) as err:
    weights.convert_file("keras", wrong, paths["weights.h5"], str(tmp_path / "out"))
  message = str(err.value)
  assert paths["weights.h5"] in message and "\n" not in message
  assert ("block1_conv1/kernel" if wrong == "xception" else "conv1_conv/kernel") in message
  assert not (tmp_path / "out").exists()


def test_resnet50_file_is_not_a_resnet101(resnet50_reference, tmp_path):
  _, paths, _, _ = resnet50_reference
  with pytest.raises(JaxsegError, match="conv4_block7_1_conv/kernel"):
    weights.convert_file("keras", "resnet101", paths["weights.h5"], str(tmp_path / "out"))


def test_cli_converts_a_keras_file(resnet50_reference, tmp_path):
  name, paths, images, reference = resnet50_reference
  out = tmp_path / "cli"
  run = subprocess.run([sys.executable, "-m", "jaxseg.weights.convert", "--source=keras",
                        f"--arch={name}", paths["legacy.h5"], str(out)],
                       capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stderr
  lines = run.stdout.strip().splitlines()
  assert [line.split("]")[1].split()[0] for line in lines[1:-1]] == ["stem", "stage1", "stage2",
                                                                  "stage3", "stage4"]
  assert "23,534,592 parameters" in lines[-1] and "53,120 BatchNorm statistics" in lines[-1]
  module, variables, preprocess = weights.load_backbone(str(out))
  features = module.apply(variables, preprocess(images), train=False)
  assert _max_relative_error(np.asarray(features["stage4"]), reference) <= 1e-4
  # A second run must not overwrite: one line naming the directory, exit status 2.
  again = subprocess.run([sys.executable, "-m", "jaxseg.weights.convert", "--source=keras",
                          f"--arch={name}", paths["legacy.h5"], str(out)],
                         capture_output=True, text=True, timeout=300, check=False)
  assert again.returncode == 2
  assert again.stderr.strip() == f"error: {out}: already exists; choose a new output directory"


def test_converted_inception_gives_fid_features_at_299(tmp_path_factory):
  """FID's features: Inception-v3's pooled mixed10 on images resized to 299x299, equal to the
  Keras model's on the same resized images."""
  from jaxseg import image_quality  # pylint: disable=g-import-not-at-top
  name, paths, _, _ = _build("inception_v3", tmp_path_factory)[:4]
  out = tmp_path_factory.mktemp("inception") / "converted"
  weights.convert_file("keras", name, paths["weights.h5"], str(out))
  features = image_quality.feature_network(str(out))
  images = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  ours = features(images)
  assert ours.shape == (2, 2048) and "inception_v3 (pooled stage4, at 299x299" in features.name
  resized = np.array(jax.image.resize(images.astype(np.float32), (2, 299, 299, 3), "bilinear"))
  big = keras.applications.InceptionV3(weights=None, include_top=False, pooling="avg",
                                       input_shape=(299, 299, 3))
  big.set_weights(_BUILT[name][5].get_weights())  # the same weights at 299x299
  reference = np.asarray(big.predict(keras.applications.inception_v3.preprocess_input(resized),
                                     verbose=0))
  assert _max_relative_error(ours, reference) <= 1e-4
