"""What one MoE layer's dispatch needs to know that is not an array: the strategy, the sizes
that set its static buffers, and where it runs on the mesh."""
from __future__ import annotations

import dataclasses
import math

import jax
from jax.sharding import Mesh

from moejax.sharding import DEFAULT_RULES


@dataclasses.dataclass(frozen=True)
class DispatchPlan:
  """Static dispatch settings of one MoE layer (hashable: it sits in the module's graphdef).

  Attributes:
    dispatch: a `DISPATCHERS` name (`capacity` | `dropless`).
    num_experts: E, experts in the bank (granularity applied).
    routing_group: R, tokens routed together under capacity dispatch; each group takes at most
      C = ceil(capacity_factor * R * K / E) copies per expert.
    capacity_factor: of capacity dispatch.
    ep_exchange: an `EP_EXCHANGES` name (`all_to_all` | `ring`): how dropless dispatch moves
      tokens to their experts when the experts are split over the `expert` mesh axis.
    ep_capacity_factor: f; 0 sizes the expert-parallel buffers for the worst case (nothing is
      ever dropped), f > 0 for f times the average load (`a2a_buffer_rows`, `ring_buffer_rows`).
    mesh: the mesh the layer runs on, or None (no mesh: one device, no collectives).
    batch_axes: the mesh axes (size > 1) the tokens are split over.
    expert_axis: `expert` when EP > 1 (the experts are split over it), else None.
    tensor_axis: `tensor` when it has size > 1 (the expert width F is split over it), else None.
    experts_per_token: K of the config, which sizes the capacity C; 0: the routing's slot
      count (routers with a variable number of experts per token have more slots than K).
    fused_gather: dropless on one expert shard: the D -> F grouped matmuls read their rows
      through the sort index and the unpermute is fused with the combine
      (`ExpertFFN.grouped_gathered`), so the [T*K, D] permuted copy and the [T, K, D] expert
      outputs are never built (`model.moe.fused_gather`).
  """
  dispatch: str
  num_experts: int
  routing_group: int = 1
  capacity_factor: float = 1.0
  ep_exchange: str = "all_to_all"
  ep_capacity_factor: float = 0.0
  mesh: Mesh | None = None
  batch_axes: tuple[str, ...] = ()
  expert_axis: str | None = None
  tensor_axis: str | None = None
  experts_per_token: int = 0
  fused_gather: bool = False

  @classmethod
  def build(cls, moe, num_experts: int, mesh: Mesh | None = None,
            experts_per_token: int = 0) -> "DispatchPlan":
    """From the `model.moe` config subtree, the bank's E and the mesh (None: no mesh)."""
    sizes = {} if mesh is None else dict(mesh.shape)
    batch = DEFAULT_RULES["batch"]
    batch = (batch,) if isinstance(batch, str) else tuple(batch)
    batch_axes = tuple(a for a in batch if sizes.get(a, 1) > 1)
    expert_axis = "expert" if sizes.get("expert", 1) > 1 else None
    tensor_axis = "tensor" if sizes.get("tensor", 1) > 1 else None
    used = batch_axes or expert_axis or tensor_axis
    return cls(dispatch=moe.dispatch, num_experts=num_experts,
               routing_group=moe.routing_group, capacity_factor=float(moe.capacity_factor),
               ep_exchange=moe.ep_exchange, ep_capacity_factor=float(moe.ep_capacity_factor),
               mesh=mesh if used else None, batch_axes=batch_axes, expert_axis=expert_axis,
               tensor_axis=tensor_axis, experts_per_token=experts_per_token,
               fused_gather=bool(moe.get("fused_gather", False)))

  @property
  def token_axes(self) -> tuple[str, ...]:
    """The mesh axes the dispatch splits the tokens over: the batch axes, and for capacity
    dispatch also `tensor` (sequence parallelism, so that the one-hot dispatch and combine
    einsums are not repeated on every tensor shard; dropless dispatch has no FLOPs outside the
    grouped matmul and keeps the tokens whole over `tensor`)."""
    extra = (self.tensor_axis,) if self.tensor_axis and self.dispatch == "capacity" else ()
    return self.batch_axes + extra

  @property
  def num_batch_shards(self) -> int:
    """Devices the tokens are split over (1 without a mesh)."""
    return math.prod(self.mesh.shape[a] for a in self.batch_axes) if self.mesh else 1

  @property
  def ep(self) -> int:
    """EP, the expert-parallel shards."""
    return self.mesh.shape[self.expert_axis] if self.expert_axis else 1


def psum(x: jax.Array, axes) -> jax.Array:
  """psum over the named axes; the identity when there are none (outside shard_map)."""
  axes = tuple(a for a in (axes if isinstance(axes, (tuple, list)) else (axes,)) if a)
  return jax.lax.psum(x, axes) if axes else x
