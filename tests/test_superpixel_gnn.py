"""The superpixel GNN, each of its layers through the shared model tester
(tests/model_tester.py: shapes at odd node and edge budgets, parameter counts from the layers'
definitions, bf16, gradients, 1 vs 8 devices), and its own: padding does not change real nodes'
logits, node order does not matter, and the pixel-weighted loss ignores padding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.data import superpixels as sp
from jaxseg.models.superpixel_gnn import LAYERS, SuperpixelGNN, node_loss
from tests import model_tester


def _graph(seed=0, h=12, w=14, n=9):
  rng = np.random.default_rng(seed)
  segments = sp.relabel(rng.integers(0, n, (h, w)))
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  return sp.region_graph(segments, image, rng.integers(0, 4, (h, w)), num_classes=4)


def _expected_params(layer, hidden=128, num_layers=4, num_classes=11):
  """The default network counted from its definition: node and edge encoders, per layer the
  layer's own weights and the LayerNorms of the residual, a linear classifier."""
  h = hidden
  dense = lambda i, o: i * o + o
  mlp = lambda i: dense(i, h) + dense(h, h)
  per_layer = {
      # Battaglia et al. 2018, Alg. 1: edges from (edge, sender, receiver), nodes from (node,
      # mean of incoming edges); both residual + LayerNorm.
      "graph_network": mlp(3 * h) + mlp(2 * h) + 2 * 2 * h,
      # Velickovic et al. 2018: a query projection, a logit from (sender, receiver, edge), the
      # node update.
      "gat": dense(h, h) + dense(3 * h, 1) + mlp(h) + 2 * h,
      # Kipf & Welling 2017: one dense layer per hop.
      "gcn": dense(h, h) + 2 * h}[layer]
  encoders = dense(sp.NODE_FEATURES, h) + dense(sp.EDGE_FEATURES, h)
  return encoders + num_layers * per_layer + dense(h, num_classes)


class _GNNTester(model_tester.ModelTester):
  """Padded graphs stacked on a leading axis, one per example (as jaxseg.train.graph lays them
  over devices) -> per-node logits; `size` is a graph's (node, edge) budget."""

  sizes = ((33, 97), (17, 161))
  step_size = (33, 97)
  output_dtype = jnp.float32  # the logits are cast for the float32 loss
  layer: str

  @property
  def references(self):
    return {"default": model_tester.Reference(
        lambda: SuperpixelGNN(num_classes=11, layer=self.layer), _expected_params(self.layer),
        inputs=lambda: (self._graphs(1, self.sizes[0], np.random.default_rng(0))[0],))}

  def make(self, dtype):
    return SuperpixelGNN(num_classes=4, hidden=16, num_layers=2, layer=self.layer, dtype=dtype)

  def _graphs(self, batch, size, rng):
    graphs = [_graph(int(seed)) for seed in rng.integers(0, 1000, batch)]
    return [sp.batch_graphs([g], max_nodes=size[0], max_edges=size[1]) for g in graphs]

  def example(self, batch, size, rng):
    return {"graph": jax.tree.map(lambda *xs: np.stack(xs), *self._graphs(batch, size, rng))}

  def init(self, model, example, key):
    first = jax.tree.map(lambda x: x[0], example["graph"])
    return model.init({"params": key, "dropout": key}, first, train=False)

  def apply(self, model, variables, example, *, train, key=None, mutable=False):
    keys = jax.random.split(key if key is not None else jax.random.key(0),
                            example["graph"].n_node.shape[0])

    def one(graph, k):
      return model.apply(variables, graph, train=train, rngs={"dropout": k}, mutable=mutable)

    out = jax.vmap(one)(example["graph"], keys)
    # The model keeps no statistics: no updates to return.
    return (out[0], {}) if mutable else out

  def loss(self, outputs, example):
    nodes = example["graph"].nodes
    k = outputs.shape[-1]
    return node_loss(outputs.reshape(-1, k), nodes["target"].reshape(-1),
                     nodes["weight"].reshape(-1))

  def expected_shapes(self, batch, size):
    return (batch, size[0], 4)

  def test_padding_does_not_change_real_nodes(self, variables):
    graphs = [_graph(0), _graph(1)]
    logits = jax.jit(functools.partial(self.make(jnp.float32).apply, variables, train=False))
    real = sum(len(g.nodes) for g in graphs)
    a = logits(sp.batch_graphs(graphs, max_nodes=40, max_edges=400))[:real]
    b = logits(sp.batch_graphs(graphs, max_nodes=90, max_edges=900))[:real]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

  def test_node_permutation_equivariance(self, variables):
    g = _graph(2)
    n = len(g.nodes)
    perm = np.random.default_rng(0).permutation(n)
    inverse = np.argsort(perm)  # old id -> new position
    shuffled = sp.RegionGraph(g.nodes[perm], g.edges, inverse[g.senders].astype(np.int32),
                              inverse[g.receivers].astype(np.int32), g.area[perm],
                              g.targets[perm], g.ignore_fraction[perm])
    logits = jax.jit(functools.partial(self.make(jnp.float32).apply, variables, train=False))
    a = logits(sp.batch_graphs([g], max_nodes=32, max_edges=200))[:n]
    b = logits(sp.batch_graphs([shuffled], max_nodes=32, max_edges=200))[:n]
    np.testing.assert_allclose(b, a[perm], rtol=1e-5, atol=1e-5)


class TestGraphNetwork(_GNNTester):
  layer = "graph_network"
  # The last layer's edge states are normalised but never read: the classifier reads nodes.
  unused_parameters = ("['edge_norm1']['bias']", "['edge_norm1']['scale']")

  def test_loss_is_pixel_weighted_and_ignores_padding(self, variables):
    batch = sp.batch_graphs([_graph(3)], max_nodes=32, max_edges=200)
    logits = jax.jit(functools.partial(self.make(jnp.float32).apply, variables, train=False))(
        batch)
    target, weight = jnp.asarray(batch.nodes["target"]), jnp.asarray(batch.nodes["weight"])
    loss = node_loss(logits, target, weight)
    # Padding logits can be anything: garbage there changes nothing.
    garbage = logits.at[int(batch.n_node[0]):].set(1e6)
    np.testing.assert_allclose(node_loss(garbage, target, weight), loss, rtol=1e-6)
    # Equals the mean CE over the pixels each node paints.
    log_p = jax.nn.log_softmax(logits)
    real = np.flatnonzero(np.asarray(weight) > 0)
    per_node = -np.asarray(log_p)[real, np.asarray(target)[real]]
    np.testing.assert_allclose(loss, np.average(per_node, weights=np.asarray(weight)[real]),
                               rtol=1e-5)


class TestGAT(_GNNTester):
  layer = "gat"


class TestGCN(_GNNTester):
  layer = "gcn"
  # A graph convolution aggregates node states only: the encoded edge features go nowhere.
  unused_parameters = ("['edge_encoder']['bias']", "['edge_encoder']['kernel']")


def test_every_layer_has_its_tester():
  assert {cls.layer for cls in (TestGraphNetwork, TestGAT, TestGCN)} == set(LAYERS)
