"""Dispatch: how token copies reach the experts and how their outputs come back.

Two strategies, looked up by `model.moe.dispatch`:
- `capacity`: GShard/Switch capacity-limited one-hot dispatch in groups of `group_size` tokens
  (Lepikhin et al. 2020, arXiv:2006.16668; Fedus et al. 2021, arXiv:2101.03961). Each expert
  takes at most C = ceil(capacity_factor * group_size * K / E) copies per group; the rest are
  dropped (the token keeps its residual) and counted.
- `dropless`: sort copies by expert, grouped matmul on the ragged groups, unsort and combine
  (MegaBlocks, Gale et al. 2022, arXiv:2211.15841). Nothing is dropped.

Both take the same `Routing` and an expert bank, and return (y [T, D], metrics).
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from moejax.routing import Routing

DISPATCHERS: dict[str, Callable] = {}


def _register(name):
  def wrap(fn):
    DISPATCHERS[name] = fn
    return fn
  return wrap


def expert_capacity(group_size: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
  """C = ceil(capacity_factor * group_size * K / E): copies one expert takes per group."""
  return max(1, math.ceil(capacity_factor * group_size * top_k / num_experts))


def capacity_masks(expert_index: jax.Array, combine_weights: jax.Array, num_experts: int,
                   capacity: int) -> tuple[jax.Array, jax.Array]:
  """One-hot dispatch and combine tensors for one group (GShard, arXiv:2006.16668, Alg. 1).

  Priority: every token's first choice is placed before any second choice, and within a choice
  earlier tokens go first, so when an expert overflows the later, lower-ranked copies are dropped.
  With K > 1 this makes a causal LM non-causal within a group: a later token's first choice can
  displace an earlier token's second choice. Top-1 (Switch) capacity routing and dropless
  dispatch stay causal.

  Args:
    expert_index: [S, K] int32, S tokens of one group.
    combine_weights: [S, K] float32.
  Returns:
    dispatch [S, E, C] in {0, 1} and combine [S, E, C] float32 (zero for dropped copies).
  """
  s, k = expert_index.shape
  mask = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)     # [S, K, E]
  by_choice = jnp.swapaxes(mask, 0, 1).reshape(k * s, num_experts)     # [K*S, E], choice-major
  position = jnp.cumsum(by_choice, axis=0) * by_choice - 1             # [K*S, E], -1 if unrouted
  position = jnp.swapaxes(position.reshape(k, s, num_experts), 0, 1)   # [S, K, E]
  slot = jnp.max(position, axis=-1)                                    # [S, K] slot in its expert
  kept = slot < capacity
  slot_1h = jax.nn.one_hot(jnp.where(kept, slot, capacity), capacity, dtype=jnp.float32)
  expert_1h = mask.astype(jnp.float32)
  dispatch = jnp.einsum("ske,skc->sec", expert_1h, slot_1h)
  combine = jnp.einsum("ske,skc,sk->sec", expert_1h, slot_1h, combine_weights)
  return dispatch, combine


@_register("capacity")
def capacity_dispatch(x: jax.Array, routing: Routing, experts, *, group_size: int,
                      capacity_factor: float) -> tuple[jax.Array, dict]:
  """Capacity-limited dispatch (see module docstring).

  Args:
    x: [T, D] tokens; T must be a multiple of group_size.
    routing: the router's decision for these T tokens.
    experts: an expert bank with `batched(xs [E, N, D]) -> [E, N, D]`.
  Returns:
    y [T, D] and {"dropped_frac": fraction of the T*K copies dropped}.
  """
  t, d = x.shape
  if t % group_size:
    raise ValueError(f"model.moe.group_size={group_size} must divide the {t} tokens of this "
                     "batch (batch_size * seq_len) under capacity dispatch")
  num_experts = routing.group_sizes.shape[0]
  k = routing.expert_index.shape[1]
  g = t // group_size
  cap = expert_capacity(group_size, num_experts, k, capacity_factor)
  dispatch, combine = jax.vmap(capacity_masks, in_axes=(0, 0, None, None))(
      routing.expert_index.reshape(g, group_size, k),
      routing.combine_weights.reshape(g, group_size, k), num_experts, cap)  # [G, S, E, C]
  xg = x.reshape(g, group_size, d)
  expert_in = jnp.einsum("gsec,gsd->egcd", dispatch.astype(x.dtype), xg)
  expert_out = experts.batched(expert_in.reshape(num_experts, g * cap, d))
  expert_out = expert_out.reshape(num_experts, g, cap, d)
  y = jnp.einsum("gsec,egcd->gsd", combine.astype(expert_out.dtype), expert_out)
  dropped = t * k - jnp.sum(dispatch)
  return y.reshape(t, d), {"dropped_frac": dropped / (t * k)}


def sort_by_expert(expert_index: jax.Array) -> jax.Array:
  """Order of the T*K token copies sorted by expert, ties in (token, slot) order.

  Args:
    expert_index: [T, K].
  Returns:
    sort_index [T*K] int32: position i of the sorted buffer holds copy sort_index[i], which is
    token sort_index[i] // K.
  """
  return jnp.argsort(expert_index.reshape(-1), stable=True).astype(jnp.int32)


def inverse_permutation(sort_index: jax.Array) -> jax.Array:
  """inverse [N] with inverse[sort_index[i]] = i (a scatter of iota; cheaper than an argsort)."""
  n = sort_index.shape[0]
  return jnp.zeros((n,), jnp.int32).at[sort_index].set(jnp.arange(n, dtype=jnp.int32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def permute(x: jax.Array, sort_index: jax.Array, inverse: jax.Array, top_k: int) -> jax.Array:
  """Gathers token copies into expert order: x [T, D] -> xs [T*K, D], xs[i] = x[sort_index[i]//K].

  `inverse` [T*K] is `inverse_permutation(sort_index)`. The backward pass is a gather by the
  inverse permutation and a sum over the K copies of each token, never a scatter-add (as in
  MaxText's MoE permute).
  """
  del inverse
  return x[sort_index // top_k]


def _permute_fwd(x, sort_index, inverse, top_k):
  return permute(x, sort_index, inverse, top_k), inverse


def _permute_bwd(top_k, inverse, dxs):
  dx = dxs[inverse].reshape(-1, top_k, dxs.shape[-1]).sum(axis=1)
  return dx, None, None


permute.defvjp(_permute_fwd, _permute_bwd)


@jax.custom_vjp
def unpermute(ys: jax.Array, sort_index: jax.Array, inverse: jax.Array) -> jax.Array:
  """Inverse of `permute` before the reduction: ys [T*K, D] in expert order -> [T*K, D] in copy
  order (copy c = token c // K, slot c % K). Backward is the forward gather, by sort_index."""
  del sort_index
  return ys[inverse]


def _unpermute_fwd(ys, sort_index, inverse):
  return unpermute(ys, sort_index, inverse), sort_index


def _unpermute_bwd(sort_index, dy):
  return dy[sort_index], None, None


unpermute.defvjp(_unpermute_fwd, _unpermute_bwd)


@_register("dropless")
def dropless_dispatch(x: jax.Array, routing: Routing, experts, **unused) -> tuple[jax.Array, dict]:
  """Dropless dispatch: permute -> grouped matmul -> unpermute -> weighted combine.

  Args:
    x: [T, D] tokens.
    routing: the router's decision.
    experts: an expert bank with `grouped(xs [T*K, D], group_sizes [E]) -> [T*K, D]`.
  Returns:
    y [T, D] and {"dropped_frac": 0.0}.
  """
  del unused
  t, d = x.shape
  k = routing.expert_index.shape[1]
  sort_index = sort_by_expert(routing.expert_index)              # [T*K]
  inverse = inverse_permutation(sort_index)                        # [T*K]
  xs = permute(x, sort_index, inverse, k)                          # [T*K, D] by expert
  ys = experts.grouped(xs, routing.group_sizes)                    # [T*K, D]
  y_copies = unpermute(ys, sort_index, inverse).reshape(t, k, d)   # [T, K, D]
  y = jnp.einsum("tk,tkd->td", routing.combine_weights.astype(y_copies.dtype), y_copies)
  return y, {"dropped_frac": jnp.zeros((), jnp.float32)}
