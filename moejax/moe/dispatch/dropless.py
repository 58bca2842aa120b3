"""Dropless dispatch: sort copies by expert, grouped matmul on the ragged groups, unsort and
combine ("MegaBlocks: Efficient Sparse Training with Mixture-of-Experts", Gale et al. 2022,
arXiv:2211.15841). Nothing is dropped on one device or data-parallel; under expert parallelism
the tokens travel to their experts by an `EP_EXCHANGES` strategy (`expert_parallel.py`).

Each device sorts and multiplies only its own T*K copies: the layer runs this inside
`jax.shard_map` over the batch axes, so sort and grouped matmul are local.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.kernels.permute import unpermute_combine
from moejax.moe.dispatch.expert_parallel import EP_EXCHANGES
from moejax.moe.dispatch.permute import (combine, inverse_permutation, permute, sort_by_expert,
                                         unpermute)
from moejax.moe.dispatch.plan import DispatchPlan


def dropless_dispatch(x: jax.Array, expert_index: jax.Array, combine_weights: jax.Array,
                      w: dict, *, ffn, plan: DispatchPlan):
  """Dropless dispatch of this device's tokens: permute -> grouped matmul -> unpermute ->
  weighted combine; with EP > 1, the plan's expert-parallel exchange.

  Args:
    x: [T, D] tokens.
    expert_index, combine_weights: [T, K] of the `Routing` (index E: no expert).
    w: expert weights {name: [E_l, D, F] / [E_l, F, D]}.
    ffn: the `ExpertFFN`.
    plan: with `plan.fused_gather` (one expert shard), the tokens are read through the sort
      index by `ffn.grouped_gathered` and unpermuted and combined in one gather.
  Returns:
    y [T, D] (a partial sum over the `tensor` axis), dropped copies, routed copies.
  """
  if plan.expert_axis:
    return EP_EXCHANGES[plan.ep_exchange](x, expert_index, combine_weights, w, ffn=ffn,
                                          plan=plan)
  t, d = x.shape
  k, e = expert_index.shape[1], plan.num_experts
  sort_index = sort_by_expert(expert_index)                              # [T*K]
  inverse = inverse_permutation(sort_index)                              # [T*K]
  group_sizes = jnp.bincount(expert_index.reshape(-1), length=e).astype(jnp.int32)   # [E]
  if plan.fused_gather:                  # no [T*K, D] copy of x, no [T, K, D] outputs
    ys = ffn.grouped_gathered(x, w, group_sizes, sort_index, inverse, k)  # [T*K, D]
    y = unpermute_combine(ys, sort_index, inverse, combine_weights)
  else:
    xs = permute(x, sort_index, inverse, k)                              # [T*K, D] by expert
    ys = ffn.grouped(xs, w, group_sizes)                                 # [T*K, D]
    y_copies = unpermute(ys, sort_index, inverse).reshape(t, k, d)       # [T, K, D]
    y = combine(y_copies, combine_weights)
  routed = jnp.sum(expert_index < e).astype(jnp.float32)
  return y, jnp.zeros((), jnp.float32), routed
