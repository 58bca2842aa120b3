"""Autonomy-of-Experts: no router; the experts' own activation norms choose them.

"Autonomy-of-Experts Models", Lv et al. 2025, arXiv:2501.13074. Each expert's first projection
(SwiGLU's gate W_g, or GeLU's up) is factorised W_e = A_e B_e, A_e [D, r], B_e [r, F]. Every
expert computes its low-rank activation for every token; the activation norms rank the experts,
the top K continue from the activations already computed, the others abort:

  h_{t,e} = x_t A_e                                   [T, E, r]   (all experts, every token)
  n_{t,e} = ||h_{t,e}||_2,   p_t = softmax_e(n_t)     [T, E]
  S_t = TopK_e(p_t),         g_{t,e} = p_{t,e} for e in S_t (not renormalised)
  y_t = sum_{e in S_t} g_{t,e} (silu(h_{t,e} B_e) * x_t U_e) W_down,e      (SwiGLU)
        sum_{e in S_t} g_{t,e}  gelu(h_{t,e} B_e) W_down,e                 (GeLU)

plus the load-balancing loss of the router-based models on p (Switch, arXiv:2101.03961, eq. 4).
The gates (softmax over all E norms, the chosen ones kept as they are) and the loss follow the
authors' reference implementation (github.com/trestad/Autonomy-of-Experts, `AoE.py`).

FLOPs per token: 2 E D r for the norms (all experts) plus the K chosen experts' 2 (r F + D F +
F D) (SwiGLU), against the sparse layer's 2 D E (router) + 2 K (3 D F). The chosen experts run
in the grouped matmul of dropless dispatch: each token copy (t, k) is one row
[x_t, h_{t,S_t[k]}] of width D + r, so the cached h is reused and the dispatch machinery
(sort, grouped matmul, expert parallelism) is the sparse layer's. Parameters per expert: D r +
r F + 2 D F (SwiGLU) against 3 D F; the paper matches the sparse model's parameter count by
widening F, which the config leaves to the user (`d_ff`, `model.moe.aoe_rank`).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from moejax.errors import ConfigError
from moejax.moe import balance
from moejax.moe.dims import moe_dims
from moejax.moe.dispatch import DispatchPlan, dispatch
from moejax.moe.experts import FFN_FORMS, GMM_BACKENDS, shared_experts
from moejax.moe.layer import VARIANT_DEFAULTS, MoEFFN, balance_groups
from moejax.moe.routing import top_k_lowest_index
from moejax.moe.variants import MOE_LAYERS
from moejax.moe.variants.mixing import refuse_options
from moejax.params import logical_param

_NORM_EPS = 1e-12    # inside the square root: a zero activation gets a finite gradient


def _swiglu(x, h, w, matmul):
  """(silu(h B) * x W_up) W_down, B = w["gate"] [r, F]."""
  return matmul(jax.nn.silu(matmul(h, w["gate"])) * matmul(x, w["up"]), w["down"])


def _gelu(x, h, w, matmul):
  """gelu(h B) W_down, B = w["up"] [r, F]."""
  del x
  return matmul(jax.nn.gelu(matmul(h, w["up"])), w["down"])


# model.moe.expert_type -> (the factorised D -> F matrix, the form with x and h = x A apart).
AOE_FORMS = {"swiglu": ("gate", _swiglu), "gelu": ("up", _gelu)}


@dataclasses.dataclass(frozen=True)
class AoEFFN:
  """The chosen experts' FFN for dropless dispatch (`ffn.grouped`), static and hashable like
  `ExpertFFN`. A dispatched row is [x (D), h (r)]: the token and its chosen expert's cached
  low-rank activation (arXiv:2501.13074, sec. 3)."""
  form: str
  gmm_backend: str
  dtype: str
  d_model: int

  def grouped(self, xs: jax.Array, w: dict, group_sizes: jax.Array) -> jax.Array:
    """xs [M, D + r] sorted by expert, w {name: [E, r or D, F] / [E, F, D]}, group_sizes [E]
    -> [M, D + r], the expert outputs then r zero columns (dispatch returns rows as wide as
    it takes them); rows past sum(group_sizes) give zeros."""
    gmm = functools.partial(GMM_BACKENDS[self.gmm_backend], group_sizes=group_sizes)
    xs = xs.astype(self.dtype)
    w = {n: v.astype(self.dtype) for n, v in w.items()}
    y = AOE_FORMS[self.form][1](xs[:, :self.d_model], xs[:, self.d_model:], w, gmm)  # [M, D]
    return jnp.pad(y, ((0, 0), (0, xs.shape[1] - self.d_model)))


def activation_norms(x: jax.Array, a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x: [T, D], a: A [E, D, r] -> (h = x A_e [T, E, r], ||h||_2 [T, E]), in float32 (the
  selection is router math)."""
  h = jnp.einsum("td,edr->ter", x.astype(jnp.float32), a.astype(jnp.float32))
  return h, jnp.sqrt(jnp.sum(h * h, axis=-1) + _NORM_EPS)


@MOE_LAYERS.register("aoe")
class AoELayer(MoEFFN):
  """Autonomy-of-Experts layer (Lv et al. 2025, arXiv:2501.13074): E experts whose factorised
  first projection A_e B_e ranks them by ||x A_e||; no router parameters.

  Config: `model.moe.layer = "aoe"`, `model.moe.aoe_rank` r (default 16), `expert_type` swiglu
  or gelu, dropless dispatch; `model.moe.router` and `router_args` are not used, and the
  sparse layer's router and bank options (loss-free balancing, null or extra experts, chains,
  expert widths, gating residual) are refused. Shared experts, `lb_loss_scope` and
  `lb_loss_weight` as the sparse layer; no z-loss (there are no router logits). Metrics:
  `load` [E], `max_vio`, `router_entropy` (of p), `lb_loss`, `experts_per_token`,
  `dropped_frac` (0: dropless). Weights: `a` [E, D, r], `w` {the
  factorised matrix: B [E, r, F], the other D -> F one [E, D, F], `down` [E, F, D]}.
  """

  def __init__(self, model: ml_collections.ConfigDict, *, rngs: nnx.Rngs,
               mesh: Mesh | None = None):
    moe = model.moe
    dims = moe_dims(model)
    dtype, param_dtype = jnp.dtype(model.dtype), jnp.dtype(model.param_dtype)
    d, e, f, r = model.d_model, dims.experts, dims.expert_width, moe.get("aoe_rank", 16)
    self.num_experts, self.top_k = e, dims.experts_per_token
    # One dispatched row per token copy: K = 1 per row.
    self.plan = DispatchPlan.build(moe, e, mesh, experts_per_token=1)
    self.lb_loss_scope, self.lb_loss_weight = moe.lb_loss_scope, moe.lb_loss_weight
    self.ffn = AoEFFN(moe.expert_type, moe.gmm_backend, dtype.name, d)
    factored = AOE_FORMS[moe.expert_type][0]
    self.a = logical_param(rngs, (e, d, r), d ** -0.5, ("expert", "embed", "expert_rank"),
                           param_dtype)
    w = {}
    for name in FFN_FORMS[moe.expert_type].in_names:
      w[name] = (logical_param(rngs, (e, r, f), r ** -0.5,
                               ("expert", "expert_rank", "expert_mlp"), param_dtype)
                 if name == factored else
                 logical_param(rngs, (e, d, f), d ** -0.5, ("expert", "embed", "expert_mlp"),
                               param_dtype))
    w["down"] = logical_param(rngs, (e, f, d), f ** -0.5, ("expert", "expert_mlp", "embed"),
                              param_dtype)
    self.w = nnx.Dict(w)
    self.shared = shared_experts(model, rngs)

  @classmethod
  def check_config(cls, model: ml_collections.ConfigDict) -> None:
    moe = model.moe
    # The sparse layer's router and bank options: AoE has neither a router nor its bank.
    refuse_options(model, {**VARIANT_DEFAULTS, "bias_update_rate": 0.0, "fused_gather": False},
                   "aoe")
    r = moe.get("aoe_rank", 16)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
      raise ConfigError("model.moe.aoe_rank", r, "a positive integer (r of the factorised "
                        "expert projection A [D, r] B [r, F])")
    if moe.expert_type not in AOE_FORMS:
      raise ConfigError("model.moe.expert_type", moe.expert_type,
                        f"one of {sorted(AOE_FORMS)} for model.moe.layer='aoe'")
    if moe.dispatch != "dropless":
      raise ConfigError("model.moe.dispatch", moe.dispatch, "'dropless' for model.moe.layer='aoe'")

  def select(self, xt: jax.Array, token_mask: jax.Array):
    """xt: [T, D], token_mask: [T] bool -> (h [T, E, r], norms [T, E], probs [T, E],
    expert_index [T, K] (E for padding), gates [T, K] float32)."""
    h, norms = activation_norms(xt, self.a[...])
    probs = jax.nn.softmax(norms, axis=-1)
    gates, index = top_k_lowest_index(probs, self.top_k)
    index = jnp.where(token_mask[:, None], index, self.num_experts)
    gates = jnp.where(token_mask[:, None], gates, 0.0)
    return h, norms, probs, index, gates

  def forward(self, x: jax.Array, segment_ids: jax.Array | None = None, *, train: bool = False,
              rng: jax.Array | None = None, token_ids: jax.Array | None = None,
              carry: dict | None = None) -> tuple[jax.Array, jax.Array, dict, dict]:
    """x: [B, S, D], segment_ids: [B, S] (0: padding, not routed) -> (y [B, S, D], weighted
    lb loss, metrics, `carry` unchanged: AoE keeps no routing state)."""
    del train, rng, token_ids
    b, s, d = x.shape
    t, k = b * s, self.top_k
    xt = x.reshape(t, d)
    mask = jnp.ones((t,), bool) if segment_ids is None else segment_ids.reshape(t) > 0
    h, _, probs, index, gates = self.select(xt, mask)
    # Row (t, k) = [x_t, h_{t, S_t[k]}]; padding's index E reads a real row, weight 0, no matmul.
    h_sel = jnp.take_along_axis(h, jnp.minimum(index, self.num_experts - 1)[:, :, None], axis=1)
    rows = jnp.concatenate([jnp.broadcast_to(xt[:, None, :], (t, k, d)), h_sel.astype(x.dtype)],
                           axis=-1).reshape(t * k, -1)                          # [T*K, D + r]
    y_rows, dispatch_metrics = dispatch(rows, index.reshape(t * k, 1), gates.reshape(t * k, 1),
                                        {n: p[...] for n, p in self.w.items()}, ffn=self.ffn,
                                        plan=self.plan)
    y = jnp.sum(y_rows[:, :d].reshape(t, k, d), axis=1)
    if self.shared is not None:
      y = y + self.shared(xt)
    group_sizes = jnp.bincount(index.reshape(-1), length=self.num_experts).astype(jnp.int32)
    groups = balance_groups(self.lb_loss_scope, self.plan.num_batch_shards, b)
    lb_loss = balance.load_balancing_loss(probs, index, mask, groups)
    tokens = jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
    copies = jnp.sum(group_sizes).astype(jnp.float32)
    metrics = {**balance.routing_metrics(probs, group_sizes, mask), **dispatch_metrics,
               "lb_loss": lb_loss,
               "experts_per_token": copies * (1.0 - dispatch_metrics["dropped_frac"]) / tokens}
    return (y.reshape(b, s, d).astype(x.dtype), self.lb_loss_weight * lb_loss, metrics,
            {} if carry is None else carry)
