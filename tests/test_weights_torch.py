"""PyTorch -> jaxseg: every state-dict key mapped with its shape, and numerical parity, for
.safetensors and .pth files of torchvision ResNets, timm xception65 and timm legacy_xception."""

import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import save_file  # noqa: E402

from jaxseg import weights  # noqa: E402
from jaxseg.errors import JaxsegError  # noqa: E402
from tests import torch_reference  # noqa: E402

SIZE = 64


def _features(module, images_uint8, **kwargs):
  """The reference's final features (NHWC) for preprocessed uint8 images."""
  x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float()
  spec = weights.PREPROCESSING[kwargs.get("preprocessing", "torch")]
  mean = torch.tensor(spec["mean"]).view(1, 3, 1, 1)
  std = torch.tensor(spec["std"]).view(1, 3, 1, 1)
  with torch.no_grad():
    out = module.forward_features((x - mean) / std)
  return out.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module", params=sorted(torch_reference.REFERENCES))
def reference(request, tmp_path_factory):
  """(arch, {format: path}, images, reference features, state dict) of one random network."""
  arch = request.param
  module = torch_reference.randomize_(torch_reference.REFERENCES[arch](), seed=len(arch))
  directory = tmp_path_factory.mktemp(arch)
  state = module.state_dict()
  paths = {"safetensors": str(directory / f"{arch}.safetensors"),
           "pth": str(directory / f"{arch}.pth")}
  save_file({k: v.contiguous() for k, v in state.items()}, paths["safetensors"])
  torch.save(state, paths["pth"])
  images = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
  preprocessing = "torch" if arch.startswith("resnet") else "tf"
  return arch, paths, images, _features(module, images, preprocessing=preprocessing), state


def _relative_error(a, b):
  return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def test_every_key_maps_with_its_shape(reference, tmp_path):
  arch, paths, _, _, state = reference
  lines = []
  meta = weights.convert_file("torch", arch, paths["safetensors"], str(tmp_path / "out"),
                              log=lines.append)
  variables, _ = weights.load_pretrained(str(tmp_path / "out"))
  # Every tensor of the state dict but the classifier and BN step counters is in the output.
  trunk = {k: v for k, v in state.items()
           if not k.startswith(("fc.", "head.")) and not k.endswith("num_batches_tracked")}
  assert meta["num_tensors"] == len(trunk) == len(jax.tree.leaves(variables))
  assert sum(x.size for x in jax.tree.leaves(variables)) == sum(v.numel() for v in trunk.values())
  assert f"ignored {len(state) - len(trunk)}" in lines[-1]


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_converted_backbone_matches_reference_features(reference, tmp_path, fmt):
  arch, paths, images, expected, _ = reference
  weights.convert_file("torch", arch, paths[fmt], str(tmp_path / "out"))
  module, variables, preprocess = weights.load_backbone(str(tmp_path / "out"))
  features = module.apply(variables, preprocess(images), train=False)
  assert features["stage4"].shape == expected.shape
  assert _relative_error(features["stage4"], expected) <= 1e-4


def test_xception65_at_output_stride_16_matches_timm_dilation(tmp_path):
  """Dilated variant: the same weights in a stride-16 reference and in jaxseg at stride 16."""
  module = torch_reference.randomize_(torch_reference.Xception65(output_stride=16), seed=3)
  path = str(tmp_path / "x65.safetensors")
  save_file({k: v.contiguous() for k, v in module.state_dict().items()}, path)
  weights.convert_file("torch", "xception65", path, str(tmp_path / "out"))
  jax_module, variables, preprocess = weights.load_backbone(str(tmp_path / "out"),
                                                            output_stride=16)
  images = np.random.default_rng(1).integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
  expected = _features(module, images, preprocessing="tf")
  got = jax_module.apply(variables, preprocess(images), train=False)["stage4"]
  assert got.shape == (1, SIZE // 16, SIZE // 16, 2048)
  assert _relative_error(got, expected) <= 1e-4


def test_training_checkpoint_layouts_are_unwrapped(reference, tmp_path):
  """{'state_dict': {'module.' + key: ...}} as saved by a DataParallel training script."""
  arch, _, images, expected, state = reference
  path = str(tmp_path / "ckpt.pt")
  torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
  weights.convert_file("torch", arch, path, str(tmp_path / "out"))
  module, variables, preprocess = weights.load_backbone(str(tmp_path / "out"))
  assert _relative_error(module.apply(variables, preprocess(images), train=False)["stage4"],
                         expected) <= 1e-4


def test_unknown_key_is_named(reference, tmp_path):
  arch, _, _, _, state = reference
  path = str(tmp_path / "extra.safetensors")
  extra = {**{k: v.contiguous() for k, v in state.items()}, "aux.proj.weight": torch.zeros(2)}
  save_file(extra, path)
  with pytest.raises(JaxsegError, match=r"extra\.safetensors: unknown key 'aux\.proj\.weight'"):
    weights.convert_file("torch", arch, path, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_wrong_arch_names_the_first_missing_key(reference, tmp_path):
  arch, paths, _, _, _ = reference
  wrong = {"resnet50": "xception65", "resnet101": "resnet50", "xception65": "legacy_xception",
           "legacy_xception": "resnet101"}[arch]
  with pytest.raises(JaxsegError) as err:
    weights.convert_file("torch", wrong, paths["pth"], str(tmp_path / "out"))
  message = str(err.value)
  assert message.startswith(paths["pth"] + ": ") and "\n" not in message
  first = {"xception65": "no tensor 'stem.0.conv.weight'",
           "resnet50": "unknown key 'layer3.6.conv1.weight'",
           "legacy_xception": "no tensor 'conv1.weight'",
           "resnet101": "tensor 'conv1.weight' has shape (32, 3, 3, 3)"}
  assert first[wrong] in message
  assert not (tmp_path / "out").exists()


# --- the real libraries (torchvision and timm are in the test extra) --------------------------

def _library_model(arch):
  # Not importorskip: the test extra brings both, so a missing one is a broken install that
  # would otherwise turn these parity tests into silent skips.
  torchvision = torch_reference.import_torchvision()
  if arch.startswith("resnet"):
    return getattr(torchvision.models, arch)(weights=None), "torch"
  import timm  # pylint: disable=g-import-not-at-top  # imports torchvision, hence after it
  return timm.create_model(arch, pretrained=False), "tf"


@pytest.mark.parametrize("arch", sorted(torch_reference.REFERENCES))
def test_parity_with_torchvision_and_timm(arch, tmp_path):
  model, preprocessing = _library_model(arch)
  torch_reference.randomize_(model, seed=5)
  path = str(tmp_path / f"{arch}.safetensors")
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
  weights.convert_file("torch", arch, path, str(tmp_path / "out"))
  module, variables, preprocess = weights.load_backbone(str(tmp_path / "out"))
  # The shape of the other tests' images: the jaxseg side runs op by op, and those ops are
  # compiled for it already.
  images = np.random.default_rng(2).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
  if arch.startswith("resnet"):
    model.forward_features = lambda x: torch.nn.Sequential(*list(model.children())[:-2])(x)
  expected = _features(model, images, preprocessing=preprocessing)
  error = _relative_error(module.apply(variables, preprocess(images), train=False)["stage4"],
                          expected)
  print(f"{arch}: max |jaxseg - reference| / max |reference| = {error:.2e}")
  assert error <= 1e-4


def test_pretrained_directory_is_self_describing(reference, tmp_path):
  arch, paths, _, _, _ = reference
  meta = weights.convert_file("torch", arch, paths["pth"], str(tmp_path / "out"))
  assert meta["input_sha256"] == __import__("hashlib").sha256(
      open(paths["pth"], "rb").read()).hexdigest()
  assert meta["preprocessing"] == weights.PREPROCESSING["torch" if arch.startswith("resnet")
                                                        else "tf"]
  assert {"metadata", "variables"} <= set(os.listdir(tmp_path / "out"))


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_half_precision_files_convert_to_float32(tmp_path, fmt):
  """Hub checkpoints are often bf16/fp16: values are widened exactly to float32."""
  module = torch_reference.REFERENCES["resnet50"]()
  state = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous()
           for k, v in torch_reference.randomize_(module, seed=9).state_dict().items()}
  path = str(tmp_path / f"half.{fmt}")
  save_file(state, path) if fmt == "safetensors" else torch.save(state, path)
  weights.convert_file("torch", "resnet50", path, str(tmp_path / "out"))
  variables, _ = weights.load_pretrained(str(tmp_path / "out"))
  kernel = variables["params"]["stage3"]["block2"]["conv2"]["conv"]["kernel"]
  assert kernel.dtype == np.float32
  np.testing.assert_array_equal(
      kernel, state["layer3.2.conv2.weight"].float().numpy().transpose(2, 3, 1, 0))
