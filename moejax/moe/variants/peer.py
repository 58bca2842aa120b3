"""PEER: product-key retrieval over a very large pool of single-neuron experts.

"Mixture of A Million Experts", Xu Owen He 2024, arXiv:2407.04153. Causal and
batch-independent: each token retrieves its experts from its own query. The paper's query
batch normalisation (an ablation that balances expert usage) is left out, since it would make a
token's routing depend on the batch.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from moejax.errors import ConfigError
from moejax.moe.balance import entropy, usage_metrics
from moejax.moe.dispatch import DispatchPlan
from moejax.moe.experts import shared_experts
from moejax.moe.layer import MoEFFN
from moejax.moe.variants import MOE_LAYERS
from moejax.moe.variants.mixing import check_int, refuse_router_options
from moejax.params import logical_param


def candidate_pairs(k: int) -> tuple[np.ndarray, np.ndarray]:
  """The rank pairs (i, j), 0-based, with (i + 1)(j + 1) <= k, in row-major order: the only
  pairs of two descending lists of k scores whose sum can be among the k largest."""
  pairs = [(i, j) for i in range(k) for j in range(k) if (i + 1) * (j + 1) <= k]
  return (np.array([i for i, _ in pairs], np.int32), np.array([j for _, j in pairs], np.int32))


def product_key_top_k(query: jax.Array, sub_keys: jax.Array,
                      k: int) -> tuple[jax.Array, jax.Array]:
  """Top-k of the N = n^2 product keys for each query (arXiv:2407.04153;
  product keys from "Large Memory Layers with Product Keys", Lample et al. 2019,
  arXiv:1907.05242).

  Key (a, b) = [c_a, c'_b] is the concatenation of a sub-key of each half, so its score splits:
      q . k_(a,b) = q_1 . c_a + q_2 . c'_b       (q = [q_1, q_2], halves of width Dq/2).
  The top-k keys of all N are among the k^2 pairs of each half's top-k sub-keys, so
      I_1 = top-k_a(q_1 . c_a),  I_2 = top-k_b(q_2 . c'_b),
      top-k over (a, b) in I_1 x I_2 of q_1 . c_a + q_2 . c'_b
  gives exactly the brute-force top-k over N. Both halves' lists are sorted, so the pair of
  ranks (i, j) is beaten by the (i + 1)(j + 1) - 1 pairs of ranks (<= i, <= j): only the pairs
  with (i + 1)(j + 1) <= k can be in the top-k, about k ln k of the k^2 (50 of 256 at k = 16),
  and the last top-k runs over those alone. Expert (a, b) has index a n + b. Float32; ties
  break towards the lower sub-key, then towards better-ranked pairs.

  `jax.lax.top_k` (ties to the lower index) is several times faster on a CPU than
  `moejax.moe.routing.top_k_lowest_index`, but GSPMD all-gathers its operand over a sharded
  token axis: with a mesh, the layer calls this function inside `jax.shard_map`
  (`PEER._retrieve`), so each device ranks only its own tokens' keys.

  Args:
    query: [T, H, Dq]; sub_keys: [2, n, Dq/2]; k: at most n.
  Returns:
    (scores [T, H, k] descending, expert index [T, H, k] int32 in [0, n^2)).
  """
  t, h, dq = query.shape
  n = sub_keys.shape[1]
  q = query.astype(jnp.float32).reshape(t * h, 2, dq // 2)
  scores = jnp.einsum("rjc,jnc->rjn", q, sub_keys.astype(jnp.float32))           # [TH, 2, n]
  # One 2-D top-k over both halves (rows alternate halves): on a CPU, several times faster
  # than top_k over the last axis of [TH, 2, n].
  v, i = (a.reshape(t * h, 2, k) for a in jax.lax.top_k(scores.reshape(t * h * 2, n), k))
  rank1, rank2 = candidate_pairs(k)
  best, pair = jax.lax.top_k(v[:, 0, rank1] + v[:, 1, rank2], k)
  a = jnp.take_along_axis(i[:, 0], jnp.asarray(rank1)[pair], axis=-1)
  b = jnp.take_along_axis(i[:, 1], jnp.asarray(rank2)[pair], axis=-1)
  return best.reshape(t, h, k), (a * n + b).reshape(t, h, k).astype(jnp.int32)


def peer(x: jax.Array, query: jax.Array, sub_keys: jax.Array, down: jax.Array, up: jax.Array,
         k: int, retrieve=product_key_top_k) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The PEER layer (arXiv:2407.04153, with its multi-head retrieval):
      f(x) = sum_{i=1..H} sum_{j in I_i(x)} g_j(x) e_j(x),   e_j(x) = gelu(u_j . x) v_j,
      I_i(x) = the top-k product keys of head i's query q_i(x) = x W_q,i (`product_key_top_k`),
      g_j(x) = softmax over I_i(x) of the scores q_i(x) . k_j.
  The H heads have their own query networks and share the experts and the product keys.

  Args:
    x: [T, D]; query: W_q [D, H, Dq]; sub_keys: [2, n, Dq/2]; down: u [N, D]; up: v [N, D];
    k: experts per head; retrieve: `product_key_top_k` or a function like it (the layer's
      runs it on each device's tokens).
  Returns:
    (y [T, D] in x.dtype, gates [T, H, k] float32, expert index [T, H, k] int32).
  """
  q = jnp.einsum("td,dhc->thc", x.astype(jnp.float32), query.astype(jnp.float32))
  scores, index = retrieve(q, sub_keys, k)
  gates = jax.nn.softmax(scores, axis=-1)                                         # [T, H, k]
  # One gather of [u_j, v_j] rows: the layer's cost on a CPU is mostly this gather.
  d = x.shape[-1]
  uv = jnp.concatenate([down, up], axis=-1).astype(x.dtype)[index]               # [T, H, k, 2D]
  u, v = uv[..., :d], uv[..., d:]
  act = jax.nn.gelu(jnp.einsum("td,thkd->thk", x, u))
  y = jnp.einsum("thk,thkd->td", (gates * act.astype(jnp.float32)).astype(x.dtype), v)
  return y, gates, index


@MOE_LAYERS.register("peer")
class PEER(MoEFFN):
  """PEER, parameter efficient expert retrieval ("Mixture of A Million Experts", He 2024,
  arXiv:2407.04153): N = n^2 experts of one hidden neuron each (u_i, v_i in R^D), H query heads
  of width Dq = D, each retrieving its top-k experts by product keys; equations in `peer`.

  Config: `model.moe.peer_experts` N (a perfect square, default 128^2 = 16384), `peer_heads`
  H (default 8) and `peer_top_k` k (default 16), the paper's H and k. The sparse layer's
  num_experts, top_k, granularity, d_ff and expert_type are not used (the experts are GELU
  neurons). Causal, batch-independent; nothing is dropped; no auxiliary loss.

  Metrics: `load` [n], each product-key row's share of the retrievals (expert (a, b) counts in
  row a: N = 16384 per-expert values would swamp the logs), `max_vio` over all N experts,
  `expert_usage` (the fraction of the N experts retrieved at least once in the batch, the
  paper's "expert usage"), `router_entropy` (of the gates over each head's k experts),
  `experts_per_token` = H k single-neuron experts, `dropped_frac` = 0.
  """
  causal = True
  batch_independent = True

  @classmethod
  def check_config(cls, model: ml_collections.ConfigDict) -> None:
    num = check_int(model, "peer_experts", 16384, 4, "peer")
    if math.isqrt(num) ** 2 != num:
      raise ConfigError("model.moe.peer_experts", num, "a perfect square n^2 (product keys "
                        "pair n sub-keys of each query half)")
    check_int(model, "peer_heads", 8, 1, "peer")
    k = check_int(model, "peer_top_k", 16, 1, "peer")
    if k > math.isqrt(num):
      raise ConfigError("model.moe.peer_top_k", k,
                        f"at most sqrt(model.moe.peer_experts) = {math.isqrt(num)}")
    if model.d_model % 2:
      raise ConfigError("model.d_model", model.d_model,
                        "an even number with model.moe.layer='peer' (the query splits in halves)")
    refuse_router_options(model, "peer")

  def __init__(self, model: ml_collections.ConfigDict, *, rngs: nnx.Rngs,
               mesh: Mesh | None = None):
    moe = model.moe
    d, pd = model.d_model, jnp.dtype(model.param_dtype)
    num = moe.get("peer_experts", 16384)
    # Where the tokens are split (the batch axes of the mesh): retrieval runs per device there.
    plan = DispatchPlan.build(moe, num, mesh)
    self.mesh, self.batch_axes = (plan.mesh, plan.batch_axes) if plan.batch_axes else (None, ())
    n, heads = math.isqrt(num), moe.get("peer_heads", 8)
    self.top_k = moe.get("peer_top_k", 16)
    self.query = logical_param(rngs, (d, heads, d), d ** -0.5, ("embed", None, None), pd)
    self.sub_keys = logical_param(rngs, (2, n, d // 2), (d // 2) ** -0.5, (None, None, None), pd)
    self.down = logical_param(rngs, (num, d), d ** -0.5, ("expert", "embed"), pd)
    # Gates sum to 1 over each head's k experts; this keeps the output's scale that of an FFN.
    self.up = logical_param(rngs, (num, d), (self.top_k / heads) ** 0.5 * d ** -0.5,
                            ("expert", "embed"), pd)
    self.shared = shared_experts(model, rngs)

  def _retrieve(self, query: jax.Array, sub_keys: jax.Array, k: int):
    """`product_key_top_k` on each device's tokens (query [T, H, Dq] split over the batch axes
    of the mesh; the sub-keys whole on every device)."""
    if self.mesh is None:
      return product_key_top_k(query, sub_keys, k)
    tokens = P(self.batch_axes, None, None)
    return jax.shard_map(functools.partial(product_key_top_k, k=k), mesh=self.mesh,
                         in_specs=(tokens, P()), out_specs=(tokens, tokens))(query, sub_keys)

  def forward(self, x, segment_ids=None, *, train=False, rng=None, token_ids=None, carry=None):
    """x: [B, S, D], segment_ids: [B, S] (0: padding) -> (y [B, S, D], aux loss 0, metrics,
    `carry` unchanged)."""
    del train, rng, token_ids
    b, s, d = x.shape
    mask = (jnp.ones((b * s,), bool) if segment_ids is None else segment_ids.reshape(b * s) > 0)
    y, gates, index = peer(x.reshape(b * s, d), self.query[...], self.sub_keys[...],
                           self.down[...], self.up[...], self.top_k, self._retrieve)
    y = jnp.where(mask[:, None], y, 0).reshape(b, s, d)
    if self.shared is not None:
      y = y + self.shared(x).astype(y.dtype)
    num, n = self.down.shape[0], self.sub_keys.shape[1]
    counts = jnp.bincount(jnp.where(mask[:, None, None], index, num).reshape(-1), length=num)
    m = mask.astype(jnp.float32)
    tokens = jnp.maximum(jnp.sum(m), 1.0)
    heads, k = gates.shape[1:]
    metrics = {"load": usage_metrics(counts.reshape(n, n).sum(axis=1))["load"],
               "max_vio": usage_metrics(counts)["max_vio"],
               "expert_usage": jnp.mean((counts > 0).astype(jnp.float32)),
               "router_entropy": jnp.sum(jnp.mean(entropy(gates), axis=1) * m) / tokens,
               "experts_per_token": jnp.asarray(heads * k, jnp.float32),
               "dropped_frac": jnp.zeros((), jnp.float32)}
    return y.astype(x.dtype), jnp.zeros((), jnp.float32), metrics, carry or {}
