"""Mixture of Tokens: every expert processes a softmax-weighted mixture of a group of tokens
taken from different sequences at the same position, and hands its output back with the same
weights.

"Mixture of Tokens: Continuous MoE through Cross-Example Aggregation", Antoniak et al. 2023,
arXiv:2310.15961.

Causal when the rows of a batch are independent sequences: a group holds the tokens of one
position s of n rows, so a token's output reads no later position of any row. Rows that
continue one another's documents (the text and Grain sources lay a stream into consecutive rows)
would leak later tokens of the same document into earlier ones: `moejax.config.validate` allows
`mot` with the synthetic source only. Batch-dependent: it reads the other sequences of its group
(rows g n .. g n + n - 1 of the batch, n = `model.moe.mot_group_size`), so a request's output
changes with the requests batched with it; n = 1 is the per-token model (every expert runs on
every token, weighted 1). A batch whose size n does not divide is padded with empty rows.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from moejax.moe.balance import entropy, usage_metrics
from moejax.moe.experts import ExpertFFN, shared_experts
from moejax.moe.layer import MoEFFN
from moejax.moe.variants import MOE_LAYERS
from moejax.moe.variants.mixing import check_int, expert_bank, linear_gate, masked_softmax, refuse_router_options


def mixture_of_tokens(x: jax.Array, token_mask: jax.Array, gate: jax.Array, w: dict,
                      ffn: ExpertFFN, group_size: int) -> tuple[jax.Array, jax.Array]:
  """Mixture of Tokens (arXiv:2310.15961) over groups of n = `group_size` rows.

  For the tokens x_1..x_n of one group (one position s of n sequences) and each expert e, with
  the controller W [D, E]:
      w_ie = exp(x_i W_e) / sum_i' exp(x_i' W_e)      mixing weights: softmax over the group
      m_e = sum_i w_ie x_i                            the expert's one input per group
      y_i = sum_e w_ie FFN_e(m_e)                     redistributed with the same weights
  Padding tokens (mask False) take no part and get output 0. Router math in float32.

  Args:
    x: [B, S, D]; token_mask: [B, S] bool; gate: [D, E]; w: the bank's weights {name: [E, D,
      F] / [E, F, D]}; ffn: how to apply them (`ExpertFFN.batched`); group_size: n.
  Returns:
    (y [B, S, D] in x.dtype, mixing weights [B, S, E] float32).
  """
  b, s, d = x.shape
  e = gate.shape[-1]
  pad = -b % group_size
  xf = jnp.pad(x.astype(jnp.float32), ((0, pad), (0, 0), (0, 0)))
  mask = jnp.pad(token_mask, ((0, pad), (0, 0)))
  groups = (b + pad) // group_size
  xg = xf.reshape(groups, group_size, s, d)
  logits = jnp.einsum("gnsd,de->gnse", xg, gate.astype(jnp.float32))
  weights = masked_softmax(logits, mask.reshape(groups, group_size, s, 1), axis=1)
  mixed = jnp.einsum("gnse,gnsd->egsd", weights, xg)                              # [E, G, S, D]
  out = ffn.batched(mixed.reshape(e, groups * s, d), w).reshape(e, groups, s, d)
  y = jnp.einsum("gnse,egsd->gnsd", weights, out.astype(jnp.float32))
  return (y.reshape(b + pad, s, d)[:b].astype(x.dtype),
          weights.reshape(b + pad, s, e)[:b])


@MOE_LAYERS.register("mot")
class MixtureOfTokens(MoEFFN):
  """Mixture of Tokens ("Mixture of Tokens: Continuous MoE through Cross-Example Aggregation",
  Antoniak et al. 2023, arXiv:2310.15961): E experts (`moe_dims`), a controller W [D, E], groups
  of n = `model.moe.mot_group_size` sequences (default 4); equations in `mixture_of_tokens`.

  Causal over independent rows (the synthetic source only), NOT batch-independent (module
  docstring). Nothing is dropped; no auxiliary loss.
  Cost: each expert runs once per group and position, E / n expert FFNs per token (the
  `experts_per_token` metric): n = E / K matches a top-K layer (4 for top-2 of 8). The paper's
  transition tuning (a softmax temperature annealed towards sparse routing) is not implemented.

  Metrics: `load` [E], the mixtures each expert processed (one per group and position that
  holds a token: equal for every expert, MaxVio 0, by construction); `max_vio`;
  `router_entropy` (mean entropy of the mixing weights over a group); `experts_per_token`;
  `dropped_frac` = 0.
  """
  causal = True
  batch_independent = False

  @classmethod
  def check_config(cls, model: ml_collections.ConfigDict) -> None:
    check_int(model, "mot_group_size", 4, 1, "mot")
    refuse_router_options(model, "mot")

  def __init__(self, model: ml_collections.ConfigDict, *, rngs: nnx.Rngs,
               mesh: Mesh | None = None):
    del mesh
    self.group_size = model.moe.get("mot_group_size", 4)
    self.gate = linear_gate(model, rngs)
    self.experts = expert_bank(model, rngs)
    self.shared = shared_experts(model, rngs)

  def forward(self, x, segment_ids=None, *, train=False, rng=None, token_ids=None, carry=None):
    """x: [B, S, D], segment_ids: [B, S] (0: padding) -> (y [B, S, D], aux loss 0, metrics,
    `carry` unchanged)."""
    del train, rng, token_ids
    b, s, _ = x.shape
    mask = jnp.ones((b, s), bool) if segment_ids is None else segment_ids > 0
    n = self.group_size
    y, weights = mixture_of_tokens(x, mask, self.gate[...], self.experts.weights(),
                                   self.experts.ffn, n)
    if self.shared is not None:
      y = y + self.shared(x).astype(y.dtype)
    m = mask.astype(jnp.float32)
    e = weights.shape[-1]
    # Group positions holding at least one token: each expert runs one mixture for each.
    pad = -b % n
    occupied = jnp.sum(jnp.any(jnp.pad(mask, ((0, pad), (0, 0))).reshape(-1, n, s), axis=1))
    tokens = jnp.maximum(jnp.sum(m), 1.0)
    # Entropy of each expert's mixing weights over its group: [G, S, E], at occupied positions.
    wg = jnp.pad(weights, ((0, pad), (0, 0), (0, 0))).reshape(-1, n, s, e)
    group_entropy = entropy(wg, axis=1)
    metrics = {**usage_metrics(jnp.full((e,), occupied, jnp.float32)),
               "router_entropy": jnp.sum(group_entropy) / jnp.maximum(occupied * e, 1),
               "experts_per_token": occupied.astype(jnp.float32) * e / tokens,
               "dropped_frac": jnp.zeros((), jnp.float32)}
    return y.astype(x.dtype), jnp.zeros((), jnp.float32), metrics, carry or {}
