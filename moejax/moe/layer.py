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

from moejax.errors import ConfigError
from moejax.moe import heterogeneous
from moejax.moe.chain import run_chain
from moejax.moe.dims import moe_dims
from moejax.moe.dispatch import DispatchPlan, dispatch
from moejax.moe.experts import ExpertBank, shared_experts
from moejax.moe.extra_experts import ZERO_COMPUTE_EXPERTS, ZeroComputeExperts, zero_compute_lb_loss
from moejax.moe.heterogeneous import param_penalty_loss
from moejax.moe.routing import ROUTERS, Router, Routing
from moejax.params import side_rngs

_VARIANT_SALT = 0x5EED   # MoELayer's side stream (moejax.params.side_rngs)

# The sparse layer's variant options (`model.moe.<field>`) and the defaults that make it the plain
# layer; what other layers refuse, and what accounting and the HF export require.
VARIANT_DEFAULTS = {"null_experts": 0, "extra_experts": (), "gating_residual": False,
                    "chain_iterations": 1, "expert_widths": ()}


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

  Variants of the sparse layer, all off by default (no parameter, no random draw, the plain
  code path):
  - `null_experts` = N and `extra_experts` = (kind, ...): zero-computation experts, router
    outputs past the E real ones resolved before dispatch (AdaMoE, arXiv:2406.13233; MoE++,
    arXiv:2410.07348; `moejax.moe.extra_experts`), with `zero_compute_lb_weight` tau;
  - `gating_residual`: MoE++'s router residual over depth (`routing.base.gating_residual`);
  - `chain_iterations` = C: Chain-of-Experts, arXiv:2506.18945 (`moejax.moe.chain`);
  - `expert_widths` (and `param_penalty_weight`): HMoE, arXiv:2408.10681
    (`moejax.moe.heterogeneous`).
  Their parameters are made after the plain ones, so those keep their initial values.
  """

  def __init__(self, model: ml_collections.ConfigDict, *, rngs: nnx.Rngs,
               mesh: Mesh | None = None):
    moe = model.moe
    dims = moe_dims(model)
    dtype, param_dtype = jnp.dtype(model.dtype), jnp.dtype(model.param_dtype)
    num_null, kinds = int(moe.get("null_experts", 0)), tuple(moe.get("extra_experts", ()) or ())
    widths = heterogeneous.expert_widths(model)
    self.plan = DispatchPlan.build(moe, dims.experts, mesh,
                                   experts_per_token=dims.experts_per_token)
    self.lb_loss_scope = moe.lb_loss_scope
    self.lb_loss_weight, self.z_loss_weight = moe.lb_loss_weight, moe.z_loss_weight
    make_router = lambda r: ROUTERS[moe.router](
        model.d_model, dims.experts + num_null + len(kinds), dims.experts_per_token, rngs=r,
        param_dtype=param_dtype, vocab_size=model.vocab_size,
        bias_update_rate=moe.bias_update_rate, **moe.router_args)
    self.router = make_router(rngs)
    self.experts = ExpertBank(dims.experts, model.d_model, max(widths or (dims.expert_width,)),
                              moe.expert_type, rngs=rngs, gmm_backend=moe.gmm_backend,
                              dtype=dtype, param_dtype=param_dtype)
    self.shared = shared_experts(model, rngs)
    # Variants (module docstring of each): built last, from a side stream of their own, so the
    # plain parameters of this layer and of every later one are drawn exactly as without them.
    variant_rngs = side_rngs(rngs, _VARIANT_SALT)
    self.expert_widths = widths
    self.param_penalty_weight = float(moe.get("param_penalty_weight", 0.0))
    if widths:
      tensor = dict(mesh.shape).get("tensor", 1) if mesh is not None else 1
      if max(widths) % tensor:
        raise ConfigError("model.moe.expert_widths", widths,
                          f"a widest width divisible by mesh.tensor={tensor} (the bank's width "
                          "is split over it)")
      heterogeneous.init_widths(self.experts, widths)
    self.zero_compute_lb_weight = float(moe.get("zero_compute_lb_weight", 1.0))
    self.zero_experts = (ZeroComputeExperts(model.d_model, dims.experts, num_null, kinds,
                                            rngs=variant_rngs, param_dtype=param_dtype)
                         if num_null or kinds else None)
    chain = int(moe.get("chain_iterations", 1))
    self.chain_routers = (nnx.List([make_router(variant_rngs) for _ in range(chain - 1)])
                          if chain > 1 else None)
    if moe.get("gating_residual", False):
      for router in self.routers():
        router.enable_gating_residual(rngs=variant_rngs, param_dtype=param_dtype)

  @classmethod
  def check_config(cls, model: ml_collections.ConfigDict) -> None:
    """Refuses bad values of the variant fields (module docstring) before anything is built."""
    moe = model.moe
    dims = moe_dims(model)
    router = ROUTERS[moe.router]
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    num_null = moe.get("null_experts", 0)
    if not (is_int(num_null) and num_null >= 0):
      raise ConfigError("model.moe.null_experts", num_null, "an integer >= 0")
    kinds = moe.get("extra_experts", ()) or ()
    if not isinstance(kinds, (tuple, list)):
      raise ConfigError("model.moe.extra_experts", kinds,
                        f"a tuple of names from {sorted(ZERO_COMPUTE_EXPERTS)}")
    for kind in kinds:
      if kind not in ZERO_COMPUTE_EXPERTS:
        raise ConfigError("model.moe.extra_experts", tuple(kinds),
                          f"a tuple of names from {sorted(ZERO_COMPUTE_EXPERTS)}")
    if (num_null or kinds) and router.per_slot_outputs:
      raise ConfigError("model.moe.null_experts / extra_experts", (num_null, tuple(kinds)),
                        f"none with router {moe.router!r}, which dispatches each slot apart")
    tau = moe.get("zero_compute_lb_weight", 1.0)
    if not (isinstance(tau, (int, float)) and not isinstance(tau, bool) and tau >= 0):
      raise ConfigError("model.moe.zero_compute_lb_weight", tau, "a number >= 0")
    residual = moe.get("gating_residual", False)
    if not isinstance(residual, bool):
      raise ConfigError("model.moe.gating_residual", residual, "True or False")
    if residual and router.carry_logits is not Router.carry_logits:
      raise ConfigError("model.moe.gating_residual", residual,
                        f"False with router {moe.router!r}, which carries its own routing state")
    chain = moe.get("chain_iterations", 1)
    if not (is_int(chain) and chain >= 1):
      raise ConfigError("model.moe.chain_iterations", chain, "an integer >= 1 (1: plain layer)")
    heterogeneous.check_widths(model, dims.experts)

  def link(self, moe_layers: list, index: int) -> None:
    """Routers that share parameters over depth (rmoe's GRU cell, arXiv:2408.06793) get the
    model's routers in depth order (`Router.link`); nothing for the others."""
    self.router.link([getattr(layer, "router", None) for layer in moe_layers], index)

  def routers(self) -> list:
    """The layer's routers: its own, then one per further Chain-of-Experts iteration."""
    return [self.router, *(self.chain_routers or ())]

  def expert_weights(self) -> dict:
    """The weights dispatch multiplies with, {name: [E, D, F] / [E, F, D]}: this layer's bank
    (with heterogeneous widths, each expert's units past its width zeroed)."""
    w = self.experts.weights()
    return heterogeneous.mask_weights(w, self.expert_widths) if self.expert_widths else w

  def update_state(self, metrics: dict) -> None:
    """After an optimizer step: each router moves its `RouterState` (with Chain-of-Experts
    iterations, router t from its own iteration's `load_iter<t>`)."""
    if self.chain_routers is None:
      return super().update_state(metrics)
    for t, router in enumerate(self.routers()):
      router.update_state({**metrics, "load": metrics[f"load_iter{t}"]})

  def route(self, x: jax.Array, token_mask: jax.Array | None = None, *, train: bool = False,
            rng: jax.Array | None = None, token_ids: jax.Array | None = None,
            num_sequences: int = 1, carry: dict | None = None, router=None) -> Routing:
    """x: [T, D], token_mask: [T] bool (False: padding), token_ids: [T] int, carry: the
    previous MoE layer's routing state -> the router's decision. `num_sequences`: B, the rows
    the T tokens come from (for `lb_loss_scope` = sequence). `router`: one of `routers()`
    (default: the layer's own)."""
    groups = balance_groups(self.lb_loss_scope, self.plan.num_batch_shards, num_sequences)
    router = self.router if router is None else router
    return router(x, token_mask, train=train, rng=rng, balance_groups=groups,
                  token_ids=token_ids, carry=carry)

  def forward(self, x: jax.Array, segment_ids: jax.Array | None = None, *, train: bool = False,
              rng: jax.Array | None = None, token_ids: jax.Array | None = None,
              carry: dict | None = None) -> tuple[jax.Array, jax.Array, dict, dict]:
    """x: [B, S, D], segment_ids: [B, S] (0: padding, not routed), token_ids: [B, S] (input
    ids, for routers that read them), carry: the previous MoE layer's routing state -> (y [B,
    S, D], weighted aux loss (scalar), metrics {name: array}, this layer's routing state).

    Metrics: `load` [E'] (over all E' router outputs: E real experts, then the null and extra
    experts when there are some), `dropped_frac`, `experts_per_token` (real
    experts that computed each routed token, after drops), `router_entropy`, `max_vio`,
    `lb_loss`, `z_loss` and the router's own; with zero-computation experts
    `zero_compute_frac` (routed copies that went to them); with expert widths
    `active_width` (hidden units computed per routed token) and `param_penalty`; with
    Chain-of-Experts `load_iter<t>` (`moejax.moe.chain`).
    """
    b, s, d = x.shape
    xt = x.reshape(b * s, d)
    mask = None if segment_ids is None else segment_ids.reshape(b * s) > 0
    ids = None if token_ids is None else token_ids.reshape(b * s)

    def step(h, router, key, state):
      return self._routed(h, mask, router=router, train=train, rng=key, token_ids=ids,
                          num_sequences=b, carry=state)

    if self.chain_routers is None:
      y, aux_loss, metrics, carry = step(xt, self.router, rng, carry)
    else:
      y, aux_loss, metrics, carry = run_chain(step, xt, self.routers(), rng=rng, carry=carry)
    return y.reshape(b, s, d).astype(x.dtype), aux_loss, metrics, carry

  def _routed(self, xt: jax.Array, mask: jax.Array | None, *, router, train: bool,
              rng: jax.Array | None, token_ids: jax.Array | None, num_sequences: int,
              carry: dict | None) -> tuple[jax.Array, jax.Array, dict, dict]:
    """One routed pass: route -> resolve zero-computation slots -> dispatch (+ shared) on xt
    [T, D] -> (y [T, D], weighted aux loss, metrics, routing state)."""
    routing = self.route(xt, mask, train=train, rng=rng, token_ids=token_ids,
                         num_sequences=num_sequences, carry=carry, router=router)
    losses = dict(routing.aux_losses)
    expert_index, combine_weights, y_zero, extra = (routing.expert_index,
                                                    routing.combine_weights, None, {})
    groups = balance_groups(self.lb_loss_scope, self.plan.num_batch_shards, num_sequences)
    if self.zero_experts is not None:
      expert_index, combine_weights, y_zero, zero_copies = self.zero_experts.resolve(
          xt, routing.expert_index, routing.combine_weights)
      extra["zero_compute_frac"] = zero_copies / jnp.maximum(
          zero_copies + jnp.sum(expert_index < self.plan.num_experts), 1.0)
      if self.zero_compute_lb_weight != 1.0:
        losses["lb_loss"] = zero_compute_lb_loss(
            routing.router_probs, routing.expert_index, routing.token_mask, groups,
            self.zero_experts.eta(self.zero_compute_lb_weight))
    if train and router.per_slot_outputs:
      y, dispatch_metrics, losses["slot_loss"] = self._per_slot(xt, routing, router)
    else:
      y, dispatch_metrics = dispatch(xt, expert_index, combine_weights, self.expert_weights(),
                                     ffn=self.experts.ffn, plan=self.plan)
    if y_zero is not None:
      y = y + y_zero.astype(y.dtype)
    if self.shared is not None:
      y = y + self.shared(xt)
    if self.expert_widths:
      losses["param_penalty"] = param_penalty_loss(routing.router_probs, routing.expert_index,
                                                   routing.token_mask, groups,
                                                   self.expert_widths)
    # lb and z losses are weighted here; the router's own losses come weighted.
    aux_loss = (self.lb_loss_weight * losses["lb_loss"] + self.z_loss_weight * losses["z_loss"]
                + losses.get("router_loss", 0.0) + losses.get("slot_loss", 0.0))
    if self.param_penalty_weight:
      aux_loss = aux_loss + self.param_penalty_weight * losses["param_penalty"]
    if self.zero_experts is None:
      copies = jnp.sum(routing.group_sizes).astype(jnp.float32)
    else:
      copies = jnp.sum(expert_index < self.plan.num_experts).astype(jnp.float32)
    tokens = jnp.maximum(jnp.sum(routing.token_mask.astype(jnp.float32)), 1.0)
    kept = 1.0 - dispatch_metrics["dropped_frac"]
    if self.expert_widths:
      width = jnp.asarray(self.expert_widths + (0,), jnp.float32)[expert_index]   # [T, K]
      extra["active_width"] = jnp.sum(width) * kept / tokens
    metrics = {**routing.metrics, **dispatch_metrics, **losses, **extra,
               "experts_per_token": copies * kept / tokens}
    return y, aux_loss, metrics, routing.carry

  def _per_slot(self, xt: jax.Array, routing: Routing, router=None):
    """Each of the K slots dispatched on its own, for routers that regularise the experts'
    outputs against each other (THOR): xt [T, D] -> (y [T, D], dispatch metrics, the router's
    `slot_loss`). Same FLOPs as one dispatch of K slots. `router`: the one that routed
    (default: the layer's own)."""
    router = self.router if router is None else router
    k = routing.expert_index.shape[1]
    ones = jnp.ones_like(routing.combine_weights[:, :1])
    w = self.expert_weights()
    outs = [dispatch(xt, routing.expert_index[:, j:j + 1], ones, w, ffn=self.experts.ffn,
                     plan=self.plan) for j in range(k)]
    y_slots = jnp.stack([o[0] for o in outs])                                   # [K, T, D]
    y = jnp.einsum("ktd,tk->td", y_slots, routing.combine_weights.astype(y_slots.dtype))
    dropped = sum(o[1]["dropped_frac"] for o in outs) / k
    return y, {"dropped_frac": dropped}, router.slot_loss(y_slots, routing.token_mask)


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
