"""The MoE layer: route -> dispatch (permute, expert FFNs, unpermute) -> combine (+ shared).

"Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer", Shazeer et
al. 2017, arXiv:1701.06538, in the token-choice form of GShard (arXiv:2006.16668).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moejax.config import moe_dims
from moejax.dispatch import DISPATCHERS
from moejax.experts import MLP, ExpertBank
from moejax.routing import ROUTERS, Routing


class MoELayer(nnx.Module):
  """Sparse FFN: a router from the registry, an expert bank, optional shared experts.

  Granularity, shared experts and the router are all config (see `moejax.config.moe_dims`).
  """

  def __init__(self, model: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    moe = model.moe
    dims = moe_dims(model)
    dtype, param_dtype = jnp.dtype(model.dtype), jnp.dtype(model.param_dtype)
    self.dispatch, self.group_size = moe.dispatch, moe.group_size
    self.capacity_factor = moe.capacity_factor
    self.lb_loss_weight, self.z_loss_weight = moe.lb_loss_weight, moe.z_loss_weight
    self.router = ROUTERS[moe.router](model.d_model, dims.num_experts, dims.top_k, rngs=rngs,
                                      param_dtype=param_dtype, **moe.router_args)
    self.experts = ExpertBank(dims.num_experts, model.d_model, dims.expert_width,
                              moe.expert_type, rngs=rngs, gmm_backend=moe.gmm_backend,
                              dtype=dtype, param_dtype=param_dtype)
    self.shared = (MLP(model.d_model, dims.shared_width, moe.expert_type, rngs=rngs,
                       dtype=dtype, param_dtype=param_dtype) if dims.shared_width else None)

  def route(self, x: jax.Array, *, train: bool = False, rng: jax.Array | None = None) -> Routing:
    """x: [T, D] -> the router's decision (exposed for notebooks and analysis)."""
    return self.router(x, train=train, rng=rng)

  def __call__(self, x: jax.Array, *, train: bool = False,
               rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array, dict]:
    """x: [B, S, D] -> (y [B, S, D], weighted aux loss (scalar), metrics {name: array}).

    Metrics: `load` [E], `dropped_frac`, `router_entropy`, `max_vio`, `lb_loss`, `z_loss`.
    """
    b, s, d = x.shape
    xt = x.reshape(b * s, d)
    routing = self.route(xt, train=train, rng=rng)
    y, dispatch_metrics = DISPATCHERS[self.dispatch](
        xt, routing, self.experts, group_size=self.group_size,
        capacity_factor=self.capacity_factor)
    if self.shared is not None:
      y = y + self.shared(xt)
    losses = routing.aux_losses
    aux_loss = (self.lb_loss_weight * losses["lb_loss"] + self.z_loss_weight * losses["z_loss"])
    metrics = {**routing.metrics, **dispatch_metrics, **losses}
    return y.reshape(b, s, d).astype(x.dtype), aux_loss, metrics
