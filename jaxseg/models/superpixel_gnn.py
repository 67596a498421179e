"""A graph network that labels superpixels: message passing over a region adjacency graph.

Nodes are SLIC superpixels with colour/shape features, edges their 4-connected adjacencies
(jaxseg.data.superpixels). Layers are jraph's: a full GraphNetwork (edge and node MLPs, as
Battaglia et al. 2018), GAT (Velickovic et al. 2018) or GCN (Kipf & Welling 2017), each with a
residual connection, LayerNorm and dropout; a linear classifier gives per-node logits.

Padding (jraph.pad_with_graphs) adds nodes joined only to each other, so the logits of real
nodes do not depend on the budget; node order does not matter either (permutation
equivariance); both are tested.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph

LAYERS = ("graph_network", "gat", "gcn")


class MLP(nn.Module):
  """Dense -> ReLU -> Dense."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.features, dtype=self.dtype)(x))
    return nn.Dense(self.features, dtype=self.dtype)(x)


class SuperpixelGNN(nn.Module):
  """Per-superpixel logits (N, num_classes) of a padded jraph.GraphsTuple.

  `graph.nodes` is the node feature array, or a dict holding it under "features".
  """
  num_classes: int
  hidden: int = 128
  num_layers: int = 4
  layer: str = "graph_network"
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, graph: jraph.GraphsTuple, *, train: bool):
    if self.layer not in LAYERS:
      raise ValueError(f"unknown layer {self.layer!r}; valid choices: {', '.join(LAYERS)}")
    features = graph.nodes["features"] if isinstance(graph.nodes, dict) else graph.nodes
    nodes = nn.Dense(self.hidden, dtype=self.dtype, name="node_encoder")(features)
    edges = nn.Dense(self.hidden, dtype=self.dtype, name="edge_encoder")(graph.edges)
    graph = graph._replace(nodes=nodes, edges=edges)
    for i in range(self.num_layers):
      new = self._layer(i)(graph)
      # Residual + LayerNorm + dropout on the node (and, for the graph network, edge) states.
      nodes = nn.LayerNorm(dtype=self.dtype, name=f"node_norm{i}")(graph.nodes + new.nodes)
      nodes = nn.Dropout(self.dropout_rate, deterministic=not train)(nodes)
      edges = graph.edges
      if self.layer == "graph_network":
        edges = nn.LayerNorm(dtype=self.dtype, name=f"edge_norm{i}")(graph.edges + new.edges)
      graph = graph._replace(nodes=nodes, edges=edges)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(graph.nodes)
    return logits.astype(jnp.float32)

  def _layer(self, i: int):
    hidden, dtype = self.hidden, self.dtype
    if self.layer == "graph_network":
      edge_mlp = MLP(hidden, dtype, name=f"edge_mlp{i}")
      node_mlp = MLP(hidden, dtype, name=f"node_mlp{i}")
      return jraph.GraphNetwork(
          update_edge_fn=lambda e, s, r, g: edge_mlp(jnp.concatenate([e, s, r], -1)),
          update_node_fn=lambda n, sent, received, g: node_mlp(
              jnp.concatenate([n, received], -1)),
          aggregate_edges_for_nodes_fn=jraph.segment_mean)
    if self.layer == "gat":
      query = nn.Dense(hidden, dtype=dtype, name=f"gat_query{i}")
      score = nn.Dense(1, dtype=dtype, name=f"gat_score{i}")
      update = MLP(hidden, dtype, name=f"gat_mlp{i}")
      return jraph.GAT(
          attention_query_fn=query,
          attention_logit_fn=lambda s, r, e: nn.leaky_relu(
              score(jnp.concatenate([s, r, e], -1)), 0.2),
          node_update_fn=update)
    return jraph.GraphConvolution(update_node_fn=nn.Dense(hidden, dtype=dtype,
                                                          name=f"gcn_dense{i}"),
                                  add_self_edges=True, symmetric_normalization=True)


def node_loss(logits, target, weight):
  """Cross-entropy per node weighted by its pixel count (0 for padding and ignored nodes), so
  the loss is the pixel-level loss of painting each superpixel with one class."""
  logits = logits.astype(jnp.float32)
  safe = jnp.where(weight > 0, target, 0)
  ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), safe[:, None], axis=-1)[:, 0]
  total = jnp.sum(weight)
  return jnp.sum(ce * weight) / jnp.maximum(total, 1.0)
