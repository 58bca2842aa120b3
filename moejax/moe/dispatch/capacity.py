"""Capacity-limited dispatch: GShard/Switch one-hot dispatch in routing groups of R tokens
("GShard: Scaling Giant Models with Conditional Computation and Automatic Sharding", Lepikhin
et al. 2020, arXiv:2006.16668, Algorithm 1; "Switch Transformers", Fedus et al. 2021,
arXiv:2101.03961). Each expert takes at most C = ceil(capacity_factor * R * K / E) copies per
group; the rest are dropped (the token keeps its residual) and counted.

Under expert parallelism (EP > 1) the [E, G, C, D] expert inputs travel to their experts with one
all-to-all over the `expert` mesh axis and come back with another, as in GShard. Under tensor
parallelism the tokens are split over `tensor` as well (sequence parallelism, "Reducing
Activation Recomputation in Large Transformer Models", Korthikanti et al. 2022,
arXiv:2205.05198): the expert inputs are all-gathered over it, each shard applies its slice of
the expert width F, and a reduce-scatter sums the slices back onto the shards' own groups. Routing groups
never straddle devices and C comes from the config, never from the device count, so the drops
are exactly those of one device.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moejax.moe.dispatch.plan import DispatchPlan


def expert_capacity(routing_group: int, num_experts: int, top_k: int,
                    capacity_factor: float) -> int:
  """C = ceil(capacity_factor * R * K / E): copies one expert takes per routing group."""
  return max(1, math.ceil(capacity_factor * routing_group * top_k / num_experts))


def capacity_masks(expert_index: jax.Array, combine_weights: jax.Array, num_experts: int,
                   capacity: int) -> tuple[jax.Array, jax.Array]:
  """One-hot dispatch and combine tensors for one routing group (GShard, Alg. 1).

  Priority: every token's first choice is placed before any second choice, and within a choice
  earlier tokens go first, so when an expert overflows the later, lower-ranked copies are dropped.
  With K > 1 this makes a causal LM non-causal within a group: a later token's first choice can
  displace an earlier token's second choice. Top-1 (Switch) capacity routing and dropless
  dispatch stay causal. A slot with the "no expert" index E takes no slot.

  Args:
    expert_index: [R, K] int32, the R tokens of one group.
    combine_weights: [R, K] float32.
  Returns:
    dispatch [R, E, C] in {0, 1} and combine [R, E, C] float32 (zero for dropped copies).
  """
  r, k = expert_index.shape
  mask = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)    # [R, K, E]; E -> zeros
  by_choice = jnp.swapaxes(mask, 0, 1).reshape(k * r, num_experts)     # [K*R, E], choice-major
  position = jnp.cumsum(by_choice, axis=0) * by_choice - 1             # [K*R, E], -1 if unrouted
  position = jnp.swapaxes(position.reshape(k, r, num_experts), 0, 1)   # [R, K, E]
  slot = jnp.max(position, axis=-1)                                    # [R, K] slot in its expert
  kept = slot < capacity
  slot_1h = jax.nn.one_hot(jnp.where(kept, slot, capacity), capacity, dtype=jnp.float32)
  expert_1h = mask.astype(jnp.float32)
  dispatch = jnp.einsum("ske,skc->sec", expert_1h, slot_1h)
  combine = jnp.einsum("ske,skc,sk->sec", expert_1h, slot_1h, combine_weights)
  return dispatch, combine


def capacity_dispatch(x: jax.Array, expert_index: jax.Array, combine_weights: jax.Array,
                      w: dict, *, ffn, plan: DispatchPlan):
  """Capacity-limited dispatch of this device's tokens (see the module docstring).

  Args:
    x: [T, D] tokens, T a multiple of R = plan.routing_group.
    expert_index, combine_weights: [T, K] of the `Routing`.
    w: expert weights {name: [E_l, D, F] / [E_l, F, D]}, E_l = E / EP local experts.
    ffn: the `ExpertFFN`.
  Returns:
    y [T, D], dropped copies, routed copies.
  """
  t, d = x.shape
  e, k, r = plan.num_experts, expert_index.shape[1], plan.routing_group
  g = t // r
  cap = expert_capacity(r, e, plan.experts_per_token or k, plan.capacity_factor)
  dispatch, combine = jax.vmap(capacity_masks, in_axes=(0, 0, None, None))(
      expert_index.reshape(g, r, k), combine_weights.reshape(g, r, k), e, cap)  # [G, R, E, C]
  expert_in = jnp.einsum("gsec,gsd->egcd", dispatch.astype(x.dtype), x.reshape(g, r, d))
  if plan.expert_axis:   # [E, G, C, D] -> [E/EP, EP*G, C, D]: my experts, every shard's groups
    expert_in = jax.lax.all_to_all(expert_in, plan.expert_axis, 0, 1, tiled=True)
  if plan.tensor_axis:   # tokens are split over `tensor` too: every F slice sees all groups
    expert_in = jax.lax.all_gather(expert_in, plan.tensor_axis, axis=1, tiled=True)
  here = expert_in.shape
  out = ffn.batched(expert_in.reshape(here[0], -1, d), w).reshape(here)
  if plan.tensor_axis:   # sum the F slices, each shard keeping its own groups
    out = jax.lax.psum_scatter(out, plan.tensor_axis, scatter_dimension=1, tiled=True)
  if plan.expert_axis:   # and back: [E/EP, EP*G, C, D] -> [E, G, C, D]
    out = jax.lax.all_to_all(out, plan.expert_axis, 1, 0, tiled=True)
  y = jnp.einsum("gsec,egcd->gsd", combine.astype(out.dtype), out)
  routed = jnp.sum(expert_index < e).astype(jnp.float32)
  return y.reshape(t, d), routed - jnp.sum(dispatch), routed
