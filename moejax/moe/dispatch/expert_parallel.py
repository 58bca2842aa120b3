"""Expert parallelism for dropless dispatch: the E experts are split over the `expert` mesh axis
(EP shards of E_l = E / EP experts each) and token copies travel to the shard of their expert.
Runs inside `jax.shard_map`; looked up by `model.moe.ep_exchange`.

- `all_to_all` (GShard's exchange, "GShard: Scaling Giant Models with Conditional Computation
  and Automatic Sharding", Lepikhin et al. 2020, arXiv:2006.16668, with MegaBlocks' sorted
  ragged groups, arXiv:2211.15841): each device sorts its copies by expert, exchanges the group
  sizes, sends each shard its copies in a fixed-size buffer with `jax.lax.all_to_all`, runs its
  local experts' grouped matmul on what it received, and sends the results back.
- `ring` (MaxText's ring of experts): all-gather the tokens over the expert axis, run only the
  local experts on every gathered token that chose one, `psum_scatter` the outputs back.

Static buffers. With T tokens per device, K copies each (distinct experts per token) and
factor f = `model.moe.ep_capacity_factor`:
- all-to-all: a device sends each of the EP shards at most B rows. One shard holds E_l experts,
  so one token sends it at most min(K, E_l) copies: B_worst = T * min(K, E_l) never drops. On
  average a shard gets T * K / EP copies, so f > 0 gives B = min(B_worst, ceil(f * T * K / EP)).
  A device receives EP * B rows and multiplies them all (static shapes): f * T * K rows, the
  data-parallel count when f = 1; B_worst costs EP * min(K, E_l) / K times that.
- ring: a device's experts see the EP * T gathered tokens, at most min(K, E_l) copies each:
  M_worst = EP * T * min(K, E_l); on average T * K, so f > 0 gives M = min(M_worst,
  ceil(f * T * K)) rows.
Overflow (only when f > 0) is dropped deterministically, the copies of highest rank first: rank
is the order (expert, token, slot) within a sending device (all-to-all) or within a receiving
shard's gathered tokens (ring), and is counted in `dropped_frac`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moejax.moe.dispatch.permute import combine, inverse_permutation, sort_by_expert
from moejax.moe.dispatch.plan import DispatchPlan
from moejax.registry import Registry

EP_EXCHANGES = Registry("model.moe.ep_exchange")


def a2a_buffer_rows(tokens: int, top_k: int, num_experts: int, ep: int, factor: float) -> int:
  """B, rows a device sends each expert shard (module docstring): T*min(K, E_l) for f = 0."""
  worst = tokens * min(top_k, num_experts // ep)
  return worst if factor <= 0 else min(worst, max(1, math.ceil(factor * tokens * top_k / ep)))


def ring_buffer_rows(tokens: int, top_k: int, num_experts: int, ep: int, factor: float) -> int:
  """M, rows a shard multiplies under `ring` (module docstring): EP*T*min(K, E_l) for f = 0."""
  worst = ep * tokens * min(top_k, num_experts // ep)
  return worst if factor <= 0 else min(worst, max(1, math.ceil(factor * tokens * top_k)))


def _kept_sizes(sizes: jax.Array, rows: int) -> jax.Array:
  """Group sizes [..., G] of groups laid out one after another, cut at `rows` rows in all."""
  end = jnp.minimum(jnp.cumsum(sizes, axis=-1), rows)
  return jnp.diff(end, axis=-1, prepend=jnp.zeros_like(end[..., :1]))


@EP_EXCHANGES.register("all_to_all")
def all_to_all_exchange(x: jax.Array, expert_index: jax.Array, combine_weights: jax.Array,
                        w: dict, *, ffn, plan: DispatchPlan):
  """Dropless dispatch with fixed-buffer all-to-alls over the expert axis (module docstring).

  Args:
    x: [T, D] this device's tokens.
    expert_index, combine_weights: [T, K] (index E: no expert).
    w: this shard's expert weights {name: [E_l, D, F] / [E_l, F, D]}.
  Returns:
    y [T, D] (partial over `tensor`), dropped copies, routed copies.
  """
  t, d = x.shape
  k, e, ep, axis = expert_index.shape[1], plan.num_experts, plan.ep, plan.expert_axis
  e_l = e // ep
  rows = a2a_buffer_rows(t, k, e, ep, plan.ep_capacity_factor)            # B
  flat = expert_index.reshape(-1)
  sort_index = sort_by_expert(expert_index)                                # [T*K]
  sizes = jnp.bincount(flat, length=e).astype(jnp.int32).reshape(ep, e_l)  # [EP, E_l]
  to_shard = jnp.sum(sizes, axis=1)                                        # [EP]
  start = jnp.cumsum(to_shard) - to_shard                                  # [EP]
  kept = _kept_sizes(sizes, rows)                                          # [EP, E_l] sent
  # 1. Group sizes first: recv_sizes[s, l] rows of local expert l come from shard s.
  recv_sizes = jax.lax.all_to_all(kept, axis, 0, 0, tiled=True)            # [EP, E_l]
  # 2. The copies, B rows per destination shard, in expert order.
  slot = jnp.arange(rows, dtype=jnp.int32)
  sent = slot[None, :] < jnp.sum(kept, axis=1)[:, None]                    # [EP, B]
  src = jnp.minimum(start[:, None] + slot[None, :], t * k - 1)             # [EP, B] sorted pos
  send = jnp.where(sent[..., None], x[sort_index[src] // k], 0)            # [EP, B, D]
  recv = jax.lax.all_to_all(send, axis, 0, 0, tiled=True)                  # [EP, B, D]
  # 3. Local experts: row i from shard s belongs to the first l with i < cumsum(recv_sizes[s]).
  ends = jnp.cumsum(recv_sizes, axis=1)                                    # [EP, E_l]
  local = jnp.sum(slot[None, :, None] >= ends[:, None, :], axis=-1)        # [EP, B]; E_l: empty
  local_sort = sort_by_expert(local.reshape(-1, 1))                        # [EP*B]
  xs = recv.reshape(ep * rows, d)[local_sort]
  ys = ffn.grouped(xs, w, jnp.sum(recv_sizes, axis=0))                     # [EP*B, D]
  back = ys[inverse_permutation(local_sort)].reshape(ep, rows, d)
  # 4. Results home, then from sorted positions back to (token, slot) copies.
  back = jax.lax.all_to_all(back, axis, 0, 0, tiled=True)                  # [EP, B, D]
  sorted_e = flat[sort_index]                                              # [T*K]
  shard = jnp.minimum(sorted_e // e_l, ep - 1)
  rank = jnp.arange(t * k, dtype=jnp.int32) - start[shard]
  ok = (sorted_e < e) & (rank < jnp.sum(kept, axis=1)[shard])
  y_sorted = jnp.where(ok[:, None], back[shard, jnp.minimum(rank, rows - 1)], 0)
  y_copies = y_sorted[inverse_permutation(sort_index)].reshape(t, k, d)
  y = combine(y_copies, combine_weights)
  routed = jnp.sum(flat < e).astype(jnp.float32)
  return y, routed - jnp.sum(kept).astype(jnp.float32), routed


@EP_EXCHANGES.register("ring")
def ring_exchange(x: jax.Array, expert_index: jax.Array, combine_weights: jax.Array,
                  w: dict, *, ffn, plan: DispatchPlan):
  """Dropless dispatch by all-gather and reduce-scatter over the expert axis (module docstring).

  Args and returns as `all_to_all_exchange`; the dropped count is over the gathered tokens'
  copies to this shard's experts (summed over the expert axis it covers every copy once).
  """
  t, d = x.shape
  k, e, ep, axis = expert_index.shape[1], plan.num_experts, plan.ep, plan.expert_axis
  e_l = e // ep
  rows = ring_buffer_rows(t, k, e, ep, plan.ep_capacity_factor)           # M
  x_all = jax.lax.all_gather(x, axis, tiled=True)                          # [EP*T, D]
  index_all = jax.lax.all_gather(expert_index, axis, tiled=True)           # [EP*T, K]
  weights_all = jax.lax.all_gather(combine_weights, axis, tiled=True)      # [EP*T, K]
  first = jax.lax.axis_index(axis) * e_l
  mine = (index_all >= first) & (index_all < first + e_l)
  local = jnp.where(mine, index_all - first, e_l)                          # [EP*T, K]; E_l: other
  sort_index = sort_by_expert(local)                                       # [EP*T*K]
  sizes = jnp.bincount(local.reshape(-1), length=e_l).astype(jnp.int32)    # [E_l]
  kept = _kept_sizes(sizes, rows)
  xs = x_all[sort_index[:rows] // k]                                       # [M, D]
  ys = ffn.grouped(xs, w, kept)                                            # [M, D]; 0 past kept
  n = ep * t * k
  y_sorted = jnp.concatenate([ys, jnp.zeros((n - rows, d), ys.dtype)]) if n > rows else ys
  y_copies = y_sorted[inverse_permutation(sort_index)].reshape(ep * t, k, d)
  y_all = combine(y_copies, weights_all)
  y = jax.lax.psum_scatter(y_all, axis, scatter_dimension=0, tiled=True)   # [T, D]
  routed = jnp.sum(expert_index < e).astype(jnp.float32)
  return y, jnp.sum(sizes - kept).astype(jnp.float32), routed
