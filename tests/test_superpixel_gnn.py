"""The superpixel GNN: padding does not change real nodes' logits, node order does not matter,
and the pixel-weighted loss ignores padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.data import superpixels as sp
from jaxseg.models.superpixel_gnn import LAYERS, SuperpixelGNN, node_loss


def _graph(seed=0, h=12, w=14, n=9):
  rng = np.random.default_rng(seed)
  segments = sp.relabel(rng.integers(0, n, (h, w)))
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  return sp.region_graph(segments, image, rng.integers(0, 4, (h, w)), num_classes=4)


def _model(layer):
  return SuperpixelGNN(num_classes=4, hidden=16, num_layers=2, layer=layer)


@pytest.mark.parametrize("layer", LAYERS)
def test_padding_does_not_change_real_nodes(layer):
  graphs = [_graph(0), _graph(1)]
  small = sp.batch_graphs(graphs, max_nodes=40, max_edges=400)
  large = sp.batch_graphs(graphs, max_nodes=90, max_edges=900)
  model = _model(layer)
  variables = model.init(jax.random.key(0), small, train=False)
  real = sum(len(g.nodes) for g in graphs)
  a = model.apply(variables, small, train=False)[:real]
  b = model.apply(variables, large, train=False)[:real]
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", LAYERS)
def test_node_permutation_equivariance(layer):
  g = _graph(2)
  n = len(g.nodes)
  perm = np.random.default_rng(0).permutation(n)
  inverse = np.argsort(perm)  # old id -> new position
  shuffled = sp.RegionGraph(g.nodes[perm], g.edges, inverse[g.senders].astype(np.int32),
                            inverse[g.receivers].astype(np.int32), g.area[perm], g.targets[perm],
                            g.ignore_fraction[perm])
  model = _model(layer)
  a_batch = sp.batch_graphs([g], max_nodes=32, max_edges=200)
  b_batch = sp.batch_graphs([shuffled], max_nodes=32, max_edges=200)
  variables = model.init(jax.random.key(0), a_batch, train=False)
  a = model.apply(variables, a_batch, train=False)[:n]
  b = model.apply(variables, b_batch, train=False)[:n]
  np.testing.assert_allclose(b, a[perm], rtol=1e-5, atol=1e-5)


def test_loss_is_pixel_weighted_and_ignores_padding():
  batch = sp.batch_graphs([_graph(3)], max_nodes=32, max_edges=200)
  model = _model("graph_network")
  variables = model.init(jax.random.key(0), batch, train=False)
  logits = model.apply(variables, batch, train=False)
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
