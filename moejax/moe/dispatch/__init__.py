"""Dispatch: how token copies reach the experts and how their outputs come back.

Strategies, looked up by `model.moe.dispatch`:
- `capacity` (`capacity.py`): GShard/Switch capacity-limited one-hot dispatch in routing groups.
- `dropless` (`dropless.py`): sort, grouped matmul, unsort (MegaBlocks); with EP > 1, the
  all-to-all or ring exchange of `expert_parallel.py`.

A strategy works on arrays only: `fn(x [T, D], expert_index [T, K], combine_weights [T, K],
weights {name: array}, *, ffn: ExpertFFN, plan: DispatchPlan) -> (y [T, D], dropped, routed)`,
on one device's tokens; y may be a partial sum over the `tensor` axis (the expert width F is
split over it) when the tokens are not split over `tensor` (`DispatchPlan.token_axes`). `dispatch` runs it inside `jax.shard_map` over the mesh axes the tokens
are split over, so each device routes, sorts and multiplies only its own tokens, with its share
of the experts (`expert` axis) and of the expert width (`tensor` axis).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax.moe.dispatch.capacity import capacity_dispatch, capacity_masks, expert_capacity
from moejax.moe.dispatch.dropless import dropless_dispatch
from moejax.moe.dispatch.expert_parallel import EP_EXCHANGES
from moejax.moe.dispatch.permute import inverse_permutation, permute, sort_by_expert, unpermute
from moejax.moe.dispatch.plan import DispatchPlan, psum
from moejax.registry import Registry

DISPATCHERS = Registry("model.moe.dispatch", {
    "capacity": capacity_dispatch,
    "dropless": dropless_dispatch,
})


def _local(x, expert_index, combine_weights, w, *, ffn, plan):
  """One device's share: the strategy, then the sums over the mesh (none without a mesh)."""
  y, dropped, routed = DISPATCHERS[plan.dispatch](x, expert_index, combine_weights, w, ffn=ffn,
                                                  plan=plan)
  if plan.tensor_axis not in plan.token_axes:      # whole tokens, F slices: sum the slices
    y = psum(y, plan.tensor_axis)
  dropped, routed = psum(dropped, plan.token_axes), psum(routed, plan.token_axes)
  return y, dropped / jnp.maximum(routed, 1.0)


def dispatch(x: jax.Array, expert_index: jax.Array, combine_weights: jax.Array, w: dict, *,
             ffn, plan: DispatchPlan) -> tuple[jax.Array, dict]:
  """Runs the plan's strategy on every device's tokens.

  Args:
    x: [T, D] tokens (split over the batch axes of the mesh).
    expert_index, combine_weights: [T, K] of the `Routing`.
    w: expert weights {name: [E, D, F] / [E, F, D]}.
    ffn: the `ExpertFFN`; plan: the `DispatchPlan`.
  Returns:
    y [T, D] and {"dropped_frac": dropped / routed copies, over the global batch}.
  """
  local = functools.partial(_local, ffn=ffn, plan=plan)
  if plan.mesh is None:
    y, dropped_frac = local(x, expert_index, combine_weights, w)
  else:
    tokens = P(plan.token_axes or None, None)
    # D -> F matrices [E, D, F] and the F -> D one [E, F, D]: experts over `expert`, F over
    # `tensor`, D whole (an FSDP-sharded D is all-gathered on the way in).
    specs = {n: P(plan.expert_axis, plan.tensor_axis, None) if n == "down"
             else P(plan.expert_axis, None, plan.tensor_axis) for n in w}
    y, dropped_frac = jax.shard_map(local, mesh=plan.mesh,
                                    in_specs=(tokens, tokens, tokens, specs),
                                    out_specs=(tokens, P()))(x, expert_index, combine_weights, w)
  return y, {"dropped_frac": dropped_frac}


__all__ = ["DISPATCHERS", "EP_EXCHANGES", "DispatchPlan", "capacity_masks", "dispatch",
           "expert_capacity", "inverse_permutation", "permute", "sort_by_expert", "unpermute"]
