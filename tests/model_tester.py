"""The checks every model owes, written once: each model's test is a subclass that says how to
build a tiny one, feed it and score it (the pattern of segmentation_models_pytorch's
tests/models/base.py).

For every model: output shapes at odd input sizes, finite outputs, the full-size parameter count
against its paper's or reference implementation's figure, bf16 compute with float32
parameters, a non-zero gradient for every parameter, and one training step equal on 1 and on 8
devices (conftest.py makes 8 CPU devices). What only one model has (parity with a reference,
attention maps, output stride) stays in that model's test file.

Compiling, not computing, is what these tests spend on CPU, so a class compiles three programs
and shares them between its tests: one forward pass holding both the float32 and the bfloat16
model, and the gradient step on 1 and on 8 devices. Shapes and full-size parameter counts come
from jax.eval_shape, which compiles nothing, and the variables are drawn on the host.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxseg import losses
from jaxseg.models import create_model

STEP_BATCH = 8  # one example per device on 8 devices
# A gradient can be zero at a model's initial values for a good reason: a zero-initialised
# BatchNorm scale (a ResNet block's last) or SAGAN's attention gamma stops the gradient of
# everything in front of it. With every parameter drawn this far from such values
# (`random_variables`), only parameters cut off from the outputs have a zero gradient.
NUDGE = 0.05


@dataclasses.dataclass(frozen=True)
class Reference:
  """A full-size model's parameter count as its paper or reference implementation gives it.

  `collections`: what the figure counts; Keras's count_params() includes the BatchNorm moving
  statistics, ("params", "batch_stats"). `inputs`: the example inputs when the tester's would
  change the count (a generator's latent width); by default the tester's at `size`.
  """
  make: Callable[[], nn.Module]
  expected: int
  collections: tuple[str, ...] = ("params",)
  size: tuple[int, int] = (64, 64)  # the input size of the tester's example inputs
  inputs: Callable[[], tuple] | None = None


def count(variables, collections=("params",)) -> int:
  """The number of values in `collections` of a variable tree."""
  return sum(x.size for c in collections for x in jax.tree.leaves(variables.get(c, {})))


def random_variables(abstract, rng: np.random.Generator):
  """Values for `abstract`, a model's variables as jax.eval_shape of its init gives them,
  drawn on the host: compiling the model's own initialisers (random numbers for every
  parameter) takes longer than anything else a tester's class compiles.

  Kernels and embedding tables: normal / sqrt(fan-in). Scales: 1 + N(0, NUDGE^2); every other
  parameter N(0, NUDGE^2), so that none sits at a value that stops a gradient (NUDGE).
  Statistics: as their initialisers set them, BatchNorm's mean 0 and variance 1, spectral
  norm's sigma 1 and a unit vector u; any other statistic is refused, to be given a rule here.
  """
  def draw(path, x):
    name = str(getattr(path[-1], "key", path[-1])).split("/")[-1]
    collection = path[0].key
    normal = rng.standard_normal(x.shape)
    if collection == "params":
      if x.ndim >= 2:
        value = normal / np.sqrt(np.prod(x.shape[:-1]))
      else:
        value = (name == "scale") + NUDGE * normal
    elif name in ("mean", "var", "sigma"):
      value = np.full(x.shape, float(name != "mean"))
    elif name == "u":
      value = normal / np.linalg.norm(normal)
    else:
      raise ValueError(f"no rule for the statistic {jax.tree_util.keystr(path)}")
    return np.asarray(value, x.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def _paths(tree):
  return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


class ModelTester:
  """Base of the per-model test classes (named Test*, in the model's test file).

  A subclass sets `references` and `sizes`, and implements `make`, `example`, `loss` and
  `expected_shapes`; `inputs`, `init` and `apply` have defaults for a model called as
  `model(image, train=...)`. A model without a published parameter count sets
  `test_parameter_count = None` with a comment saying so.
  """

  references: dict[str, Reference] = {}
  sizes: tuple[tuple[int, int], ...] = ((65, 97),)  # odd: padding and cropping paths run
  step_size: tuple[int, int] = (33, 41)  # the compiled step's input size
  batch_size = 2
  # The outputs' dtype with bf16 compute; None: the compute dtype. Models that cast their
  # outputs for a float32 loss set jnp.float32 (and the float32/bf16 comparison below still
  # shows that they computed in bf16).
  output_dtype: Any = None
  # Parameters that do not reach the outputs at all (their gradient is exactly zero), each
  # with the reason in the subclass; the check fails for any other, and for these once fixed.
  unused_parameters: tuple[str, ...] = ()

  # --- what a model's subclass provides -----------------------------------------------------

  def make(self, dtype) -> nn.Module:
    """The tiny model computing in `dtype`."""
    raise NotImplementedError

  def example(self, batch: int, size: tuple[int, int], rng: np.random.Generator) -> dict:
    """Inputs and targets of `batch` examples, every array batch-major (so it shards)."""
    raise NotImplementedError

  def loss(self, outputs, example):
    """A float32 scalar that every output depends on."""
    raise NotImplementedError

  def expected_shapes(self, batch: int, size: tuple[int, int]):
    """The outputs' shapes, as a tree like the outputs'."""
    raise NotImplementedError

  def check_outputs(self, outputs) -> None:
    """Assertions on a model's output values of its own (e.g. a range); both precisions."""

  def inputs(self, example) -> tuple:
    """The positional arguments of the model's __call__."""
    return (example["image"],)

  def init(self, model, example, key):
    variables = model.init({"params": key, "dropout": key}, *self.inputs(example), train=False)
    # Sown intermediates (attention maps) are outputs, not state.
    return {c: v for c, v in variables.items() if c in ("params", "batch_stats")}

  def apply(self, model, variables, example, *, train, key=None, mutable=False):
    rngs = {"dropout": key} if key is not None else None
    return model.apply(variables, *self.inputs(example), train=train, rngs=rngs,
                       mutable=mutable)

  # --- shared state of a class: compiled once -----------------------------------------------

  @pytest.fixture(scope="class")
  @classmethod
  def variables(cls):
    """Variables of the float32 model (`random_variables`); class-scoped fixtures are
    classmethods, so the hooks run on an instance made here."""
    self = cls()
    example = self.example(STEP_BATCH, self.step_size, np.random.default_rng(0))
    model = self.make(jnp.float32)
    abstract = jax.eval_shape(lambda e: self.init(model, e, jax.random.key(0)), example)
    return random_variables(abstract, np.random.default_rng(1))

  def _step(self, variables, devices):
    """(loss, gradients, the updated statistics) of the step example on `devices`: the batch
    split over them, everything else replicated."""
    model = self.make(jnp.float32)

    def step(variables, example, key):
      def loss_fn(params):
        outputs, updates = self.apply(model, {**variables, "params": params}, example,
                                      train=True, key=key, mutable=["batch_stats"])
        return self.loss(outputs, example).astype(jnp.float32), updates

      (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
      return loss, grads, updates

    mesh = Mesh(np.asarray(devices), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    batch = NamedSharding(mesh, PartitionSpec("data"))
    example = self.example(STEP_BATCH, self.step_size, np.random.default_rng(2))
    compiled = jax.jit(step, in_shardings=(replicated, batch, replicated),
                       out_shardings=replicated)
    return jax.device_get(compiled(variables, example, jax.random.key(3)))

  @pytest.fixture(scope="class")
  @classmethod
  def one_device(cls, variables):
    return cls()._step(variables, jax.devices()[:1])

  # --- the checks -----------------------------------------------------------------------------

  def test_output_shapes_at_odd_sizes(self):
    model = self.make(jnp.float32)
    for size in self.sizes:
      example = self.example(self.batch_size, size, np.random.default_rng(0))
      outputs = jax.eval_shape(lambda e: self.apply(  # pylint: disable=cell-var-from-loop
          model, self.init(model, e, jax.random.key(0)), e, train=False), example)
      assert jax.tree.map(lambda x: x.shape, outputs) == self.expected_shapes(
          self.batch_size, size), size

  def test_float32_and_bf16_outputs_are_finite_and_close(self, variables):
    """Both models run on the same float32 variables at the first odd size: finite, the bf16
    outputs in the bf16 model's dtype, and near the float32 ones without being equal to them
    (equal would mean that nothing ran in bf16)."""
    example = self.example(self.batch_size, self.sizes[0], np.random.default_rng(4))
    f32, bf16 = self.make(jnp.float32), self.make(jnp.bfloat16)
    out32, out16 = jax.device_get(jax.jit(lambda v, e: (
        self.apply(f32, v, e, train=False), self.apply(bf16, v, e, train=False)))(
            variables, example))
    shapes = self.expected_shapes(self.batch_size, self.sizes[0])
    assert jax.tree.map(lambda x: x.shape, out16) == shapes
    self.check_outputs(out32)
    self.check_outputs(out16)
    dtype = jnp.dtype(self.output_dtype or jnp.bfloat16)
    for path, a, b in zip(_paths(out32), jax.tree.leaves(out32), jax.tree.leaves(out16)):
      assert a.dtype == jnp.float32 and b.dtype == dtype, (path, a.dtype, b.dtype)
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      assert np.isfinite(a).all() and np.isfinite(b).all(), path
      error = np.linalg.norm(b - a) / np.linalg.norm(a)
      assert 0 < error < 0.1, (path, error)

  def test_params_stay_float32_under_bf16_compute(self):
    example = self.example(self.batch_size, self.sizes[0], np.random.default_rng(0))
    model = self.make(jnp.bfloat16)
    variables = jax.eval_shape(lambda e: self.init(model, e, jax.random.key(0)), example)
    # Parameters and statistics (BatchNorm's, spectral norm's) alike.
    dtypes = {x.dtype for x in jax.tree.leaves(variables)}
    assert dtypes == {jnp.dtype(jnp.float32)}, dtypes

  def test_parameter_count(self, reference: Reference):
    model = reference.make()
    if reference.inputs is not None:
      args = reference.inputs()
    else:
      args = self.inputs(self.example(1, reference.size, np.random.default_rng(0)))
    variables = jax.eval_shape(lambda *a: model.init(
        {"params": jax.random.key(0), "dropout": jax.random.key(1)}, *a, train=False), *args)
    assert count(variables, reference.collections) == reference.expected

  def test_every_parameter_gets_a_nonzero_gradient(self, one_device):
    loss, grads, _ = one_device
    assert np.isfinite(loss)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    zero = {path for path, g in zip(_paths(grads), jax.tree.leaves(grads)) if not np.any(g)}
    assert zero == set(self.unused_parameters)

  def test_one_step_on_8_devices_equals_1_device(self, variables, one_device):
    """A training step's loss, gradients and updated statistics (synchronised BatchNorm: those
    of the global batch) on 8 devices, each with one example, against 1 device with all 8.

    Gradients are compared to 5e-2 of their size, not 1e-6: BatchNorm with batch statistics
    amplifies the rounding of its sums through the backward pass, so that merely reordering the
    batch on one device moves the attention U-Net's by up to 1.6e-2 (1 vs 8 devices: 1e-4 to
    2e-3 here). A gradient below 1% of a typical one, down to rounding level (a bias whose
    shift the next BatchNorm removes), is compared on that scale. A real fault (BatchNorm
    statistics per device, gradients summed instead of averaged) is of the gradients' order.
    """
    assert jax.device_count() == 8
    loss1, grads1, stats1 = one_device
    loss8, grads8, stats8 = self._step(variables, jax.devices())
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    assert jax.tree.structure(grads8) == jax.tree.structure(grads1)
    leaves1, leaves8 = jax.tree.leaves(grads1), jax.tree.leaves(grads8)
    # The size of an entry of a typical gradient.
    typical = np.sqrt(sum(np.sum(np.square(g)) for g in leaves1) / sum(g.size for g in leaves1))
    for path, a, b in zip(_paths(grads1), leaves1, leaves8):
      scale = max(np.linalg.norm(a), 1e-2 * typical * np.sqrt(a.size))
      error = np.linalg.norm(b - a) / scale
      assert error <= 5e-2, (path, error)
    assert jax.tree.structure(stats8) == jax.tree.structure(stats1)
    for path, a, b in zip(_paths(stats1), jax.tree.leaves(stats1), jax.tree.leaves(stats8)):
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=path)

  def pytest_generate_tests(self, metafunc):
    """One test_parameter_count per entry of the subclass's `references`."""
    if "reference" in metafunc.fixturenames:
      metafunc.parametrize("reference", list(self.references.values()),
                           ids=list(self.references))


# --- the families ----------------------------------------------------------------------------


class SegmentationModelTester(ModelTester):
  """A model of jaxseg.models' registry, image (B, H, W, 3) -> logits (B, H, W, K): `name` and
  the tiny model's `kwargs` are all a subclass needs besides its references."""

  name: str
  kwargs: dict[str, Any] = {}
  num_classes = 3

  def make(self, dtype):
    return create_model(self.name, num_classes=self.num_classes, dtype=dtype, **self.kwargs)

  def example(self, batch, size, rng):
    # Normalised images and labels, as the train step gives the model and its loss.
    return {"image": rng.standard_normal((batch, *size, 3)).astype(np.float32),
            "label": rng.integers(0, self.num_classes, (batch, *size)).astype(np.int32)}

  def loss(self, outputs, example):
    return losses.softmax_cross_entropy(outputs, example["label"])

  def expected_shapes(self, batch, size):
    return (batch, *size, self.num_classes)


class BackboneTester(ModelTester):
  """A backbone, image -> {"stem", "stage1".."stage4"} features: `features` gives each one's
  channels and reduction."""

  features: dict[str, tuple[int, int]] = {}

  def example(self, batch, size, rng):
    return {"image": rng.standard_normal((batch, *size, 3)).astype(np.float32)}

  def loss(self, outputs, example):
    # Every stage's features count (a mean alone would not reach a final BatchNorm's scale).
    del example
    return sum(jnp.mean(jnp.square(f.astype(jnp.float32))) for f in outputs.values())

  def spatial(self, name: str, size: tuple[int, int]) -> tuple[int, int]:
    """A feature map's size for an input of `size`: padded convolutions and pools round up."""
    reduction = self.features[name][1]
    return tuple(-(-s // reduction) for s in size)

  def expected_shapes(self, batch, size):
    return {name: (batch, *self.spatial(name, size), c)
            for name, (c, _) in self.features.items()}
