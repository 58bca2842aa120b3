"""The MoE layer: route -> dispatch (permute, grouped matmul, unpermute) -> combine (+ shared).

"Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer", Shazeer et
al. 2017, arXiv:1701.06538, in the token-choice form of GShard (arXiv:2006.16668).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from moejax.moe.dims import moe_dims
from moejax.moe.dispatch import DispatchPlan, dispatch
from moejax.moe.experts import MLP, ExpertBank, SharedExperts
from moejax.moe.routing import ROUTERS, Routing


class MoEFFN(nnx.Module):
  """What every MoE FFN of the layer registry (`moejax.moe.variants.MOE_LAYERS`,
  `model.moe.layer`) is to the model's blocks.

  Constructor: `(model: the config's model subtree, *, rngs, mesh=None)`. A layer implements
  `forward(x [B, S, D], segment_ids [B, S] or None, *, train, rng, token_ids [B, S] or None,
  carry) -> (y [B, S, D], weighted aux loss (scalar), metrics {name: array}, carry)`, where
  `carry` ({name: [B*S, ...]}) is the routing state one MoE layer hands the next ({} at the
  first; a layer that keeps none hands on what it got). Calling the layer runs `forward` from
  an empty carry and returns the first three.

  `check_config(model)` (a classmethod) raises `ConfigError` for options the layer cannot take;
  it runs in `moejax.config.validate`, before anything is compiled.
  """

  @classmethod
  def check_config(cls, model: ml_collections.ConfigDict) -> None:
    del model

  def forward(self, x, segment_ids=None, *, train=False, rng=None, token_ids=None, carry=None):
    raise NotImplementedError

  def link(self, moe_layers: list, index: int) -> None:
    """Called once by the model after all its blocks are built: `moe_layers` are the model's
    MoE FFNs in depth order, this one at `index`. For layers that use other layers'
    parameters (cross-layer expert reuse); nothing by default."""
    del moe_layers, index

  def update_state(self, metrics: dict) -> None:
    """After an optimizer step, from this layer's global-batch metrics: moves the layer's
    `RouterState` (the router's by default; see `Router.update_state`)."""
    router = getattr(self, "router", None)
    if router is not None:
      router.update_state(metrics)

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None, *, train: bool = False,
               rng: jax.Array | None = None,
               token_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array, dict]:
    """x: [B, S, D], segment_ids: [B, S] (0: padding), token_ids: [B, S] -> (y [B, S, D],
    weighted aux loss, metrics); `forward` without a carry."""
    y, aux_loss, metrics, _ = self.forward(x, segment_ids, train=train, rng=rng,
                                           token_ids=token_ids, carry={})
    return y, aux_loss, metrics


class MoELayer(MoEFFN):
  """Sparse FFN: a router from the registry, an expert bank, optional shared experts.

  Granularity, shared experts, the router and the dispatch are all config (`moejax.moe.dims`,
  `model.moe`). `mesh` is where the layer runs (None: one device); with a mesh, dispatch runs
  inside `jax.shard_map` and every device works on its own tokens only.
  """

  def __init__(self, model: ml_collections.ConfigDict, *, rngs: nnx.Rngs,
               mesh: Mesh | None = None):
    moe = model.moe
    dims = moe_dims(model)
    dtype, param_dtype = jnp.dtype(model.dtype), jnp.dtype(model.param_dtype)
    self.plan = DispatchPlan.build(moe, dims.experts, mesh,
                                   experts_per_token=dims.experts_per_token)
    self.lb_loss_scope = moe.lb_loss_scope
    self.lb_loss_weight, self.z_loss_weight = moe.lb_loss_weight, moe.z_loss_weight
    self.router = ROUTERS[moe.router](model.d_model, dims.experts, dims.experts_per_token,
                                      rngs=rngs, param_dtype=param_dtype,
                                      vocab_size=model.vocab_size,
                                      bias_update_rate=moe.bias_update_rate, **moe.router_args)
    self.experts = ExpertBank(dims.experts, model.d_model, dims.expert_width, moe.expert_type,
                              rngs=rngs, gmm_backend=moe.gmm_backend, dtype=dtype,
                              param_dtype=param_dtype)
    shared_cls = SharedExperts if moe.get("shared_expert_gate", False) else MLP
    self.shared = (shared_cls(model.d_model, dims.shared_width, moe.expert_type, rngs=rngs,
                              dtype=dtype, param_dtype=param_dtype) if dims.shared_width else None)

  def expert_weights(self) -> dict:
    """The weights dispatch multiplies with, {name: [E, D, F] / [E, F, D]}: this layer's bank."""
    return self.experts.weights()

  def route(self, x: jax.Array, token_mask: jax.Array | None = None, *, train: bool = False,
            rng: jax.Array | None = None, token_ids: jax.Array | None = None,
            num_sequences: int = 1, carry: dict | None = None) -> Routing:
    """x: [T, D], token_mask: [T] bool (False: padding), token_ids: [T] int, carry: the
    previous MoE layer's routing state -> the router's decision. `num_sequences`: B, the rows
    the T tokens come from (for `lb_loss_scope` = sequence)."""
    groups = balance_groups(self.lb_loss_scope, self.plan.num_batch_shards, num_sequences)
    return self.router(x, token_mask, train=train, rng=rng, balance_groups=groups,
                       token_ids=token_ids, carry=carry)

  def forward(self, x: jax.Array, segment_ids: jax.Array | None = None, *, train: bool = False,
              rng: jax.Array | None = None, token_ids: jax.Array | None = None,
              carry: dict | None = None) -> tuple[jax.Array, jax.Array, dict, dict]:
    """x: [B, S, D], segment_ids: [B, S] (0: padding, not routed), token_ids: [B, S] (input
    ids, for routers that read them), carry: the previous MoE layer's routing state -> (y [B,
    S, D], weighted aux loss (scalar), metrics {name: array}, this layer's routing state).

    Metrics: `load` [E], `dropped_frac`, `experts_per_token` (experts that computed each routed
    token, after drops), `router_entropy`, `max_vio`, `lb_loss`, `z_loss` and the router's own.
    """
    b, s, d = x.shape
    xt = x.reshape(b * s, d)
    mask = None if segment_ids is None else segment_ids.reshape(b * s) > 0
    ids = None if token_ids is None else token_ids.reshape(b * s)
    routing = self.route(xt, mask, train=train, rng=rng, token_ids=ids, num_sequences=b,
                         carry=carry)
    losses = dict(routing.aux_losses)
    if train and self.router.per_slot_outputs:
      y, dispatch_metrics, losses["slot_loss"] = self._per_slot(xt, routing)
    else:
      y, dispatch_metrics = dispatch(xt, routing.expert_index, routing.combine_weights,
                                     self.expert_weights(), ffn=self.experts.ffn, plan=self.plan)
    if self.shared is not None:
      y = y + self.shared(xt)
    # lb and z losses are weighted here; the router's own losses come weighted.
    aux_loss = (self.lb_loss_weight * losses["lb_loss"] + self.z_loss_weight * losses["z_loss"]
                + losses.get("router_loss", 0.0) + losses.get("slot_loss", 0.0))
    copies = jnp.sum(routing.group_sizes).astype(jnp.float32)
    tokens = jnp.maximum(jnp.sum(routing.token_mask.astype(jnp.float32)), 1.0)
    metrics = {**routing.metrics, **dispatch_metrics, **losses,
               "experts_per_token": copies * (1.0 - dispatch_metrics["dropped_frac"]) / tokens}
    return y.reshape(b, s, d).astype(x.dtype), aux_loss, metrics, routing.carry


  def _per_slot(self, xt: jax.Array, routing: Routing):
    """Each of the K slots dispatched on its own, for routers that regularise the experts'
    outputs against each other (THOR): xt [T, D] -> (y [T, D], dispatch metrics, the router's
    `slot_loss`). Same FLOPs as one dispatch of K slots."""
    k = routing.expert_index.shape[1]
    ones = jnp.ones_like(routing.combine_weights[:, :1])
    outs = [dispatch(xt, routing.expert_index[:, j:j + 1], ones, self.expert_weights(),
                     ffn=self.experts.ffn, plan=self.plan) for j in range(k)]
    y_slots = jnp.stack([o[0] for o in outs])                                   # [K, T, D]
    y = jnp.einsum("ktd,tk->td", y_slots, routing.combine_weights.astype(y_slots.dtype))
    dropped = sum(o[1]["dropped_frac"] for o in outs) / k
    return y, {"dropped_frac": dropped}, self.router.slot_loss(y_slots, routing.token_mask)


LB_LOSS_SCOPES = ("micro_batch", "global_batch", "sequence")


def balance_groups(scope: str, num_batch_shards: int, num_sequences: int) -> int:
  """How many equal groups of consecutive tokens the load-balancing loss averages over.

  `global_batch`: one, the whole batch ("Demons in the Detail: On Implementing Load Balancing
  Loss for Training Specialized Mixture-of-Expert Models", Qiu et al. 2025, arXiv:2501.11873);
  `micro_batch`: one per device's share of the batch (the statistics each device sees alone,
  what most codebases compute); `sequence`: one per row, DeepSeek-V3's sequence-wise balance
  loss (arXiv:2412.19437, eqs. 17-20).
  """
  return {"global_batch": 1, "micro_batch": num_batch_shards, "sequence": num_sequences}[scope]
