"""ReXMoE: routers that reuse the experts of neighbouring MoE layers.

"ReXMoE: Reusing Experts with Minimal Overhead in Mixture-of-Experts", Tan et al. 2025,
arXiv:2510.17483. Layer i's router chooses among its own E experts and those of the MoE layers
within `model.moe.reuse_range` r of it; only the router grows (D x W E instead of D x E), the
expert parameters are those of the plain model. With the pool of W consecutive MoE layers
[s, s + W), W = min(2r + 1, L) (L the model's MoE layers):

  pool index j = w E + e  (0 <= w < W, 0 <= e < E)  ->  expert e of MoE layer s + w
  y_i(x) = sum_{j in TopK(p(x))} p_j(x) FFN_j(x),   p(x) = router_i(x) over the W E pool

FFN_j is the neighbour's expert itself (shared weights; its gradient sums over every layer that
used it). The window slides to stay inside the model: s = clip(i - r, 0, L - W), so every layer
has the same pool size W E (one router and dispatch shape for all layers): the first layer's
pool is layers [0, W), the last one's [L - W, L).

Not implemented: the paper's progressive scaling routing (PSR), which masks part of the pool at
the start of training and unmasks it gradually until the whole pool is available. It needs a
mask on the router's logits inside `Router.__call__`, which routers do not take yet (a
`logit_mask` [E] argument of `Router.__call__`, applied before `decide`, would do).
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from moejax.errors import ConfigError
from moejax.moe.dims import is_moe_layer, moe_dims
from moejax.moe.dispatch import DispatchPlan
from moejax.moe.layer import VARIANT_DEFAULTS, MoELayer
from moejax.moe.routing import ROUTERS
from moejax.moe.variants import MOE_LAYERS
from moejax.moe.variants.mixing import refuse_options


# Sparse-layer options (`moejax.moe.layer.MoELayer`) built around one layer's own bank of E
# experts (extra router outputs, per-expert widths, extra routers): not taken by the pool layer.
_OWN_BANK_OPTIONS = {k: v for k, v in VARIANT_DEFAULTS.items() if k != "gating_residual"}


def num_moe_layers(model: ml_collections.ConfigDict) -> int:
  """L, the MoE layers of the model."""
  return sum(is_moe_layer(model, i) for i in range(model.num_layers))


def pool_window(index: int, num_layers: int, reuse_range: int) -> tuple[int, int]:
  """(s, W): MoE layer `index` (of L = `num_layers`) pools the experts of MoE layers [s, s + W),
  W = min(2r + 1, L), s = clip(index - r, 0, L - W)."""
  width = min(2 * reuse_range + 1, num_layers)
  return min(max(index - reuse_range, 0), num_layers - width), width


@MOE_LAYERS.register("rexmoe")
class ReXMoELayer(MoELayer):
  """ReXMoE's layer (Tan et al. 2025, arXiv:2510.17483): a `MoELayer` whose router and dispatch
  plan are built for the pool of W E experts of the MoE layers around it (`pool_window`), its
  own bank among them. `link` (the model calls it once all blocks exist) keeps references to
  the neighbours' `ExpertBank`s; nnx stores a shared bank once, so the model has exactly the
  plain model's expert parameters (each under the path of the first layer that reaches it in
  depth order) plus the routers grown to W E outputs (the linear gate: D (W - 1) E more
  weights per layer).

  Config: `model.moe.layer = "rexmoe"`, `model.moe.reuse_range` r >= 0 (default 1; 0 is the
  plain layer with its own experts only). Metrics as `MoELayer`, `load` over the W E pool.
  Of the sparse layer's variant options it takes `gating_residual` (over the pool's logits) and
  refuses those built around one bank (`null_experts`, `extra_experts`, `chain_iterations`,
  `expert_widths`).

  Left out: the paper's progressive scaling routing (the candidate pool grown during training;
  its schedule is in the full text, which was not at hand here). Cost on an expert-parallel
  mesh: the pool concatenates W banks each split over `expert`, which does not line up with
  dispatch's split of the W E pool, so GSPMD moves pooled weights (and their gradients) between
  devices each step; the numbers are right, the traffic is extra.
  """

  def __init__(self, model: ml_collections.ConfigDict, *, rngs: nnx.Rngs,
               mesh: Mesh | None = None):
    super().__init__(model, rngs=rngs, mesh=mesh)
    moe, dims = model.moe, moe_dims(model)
    self.reuse_range = moe.get("reuse_range", 1)
    self.num_moe_layers = num_moe_layers(model)
    _, self.window = pool_window(0, self.num_moe_layers, self.reuse_range)
    pool = self.window * dims.experts
    # The router and the plan of the sparse layer, rebuilt for the pool (the first ones are
    # dropped; this costs one unused draw of the init key).
    self.plan = DispatchPlan.build(moe, pool, mesh, experts_per_token=dims.experts_per_token)
    self.router = ROUTERS[moe.router](model.d_model, pool, dims.experts_per_token, rngs=rngs,
                                      param_dtype=jnp.dtype(model.param_dtype),
                                      vocab_size=model.vocab_size,
                                      bias_update_rate=moe.bias_update_rate, **moe.router_args)
    if moe.get("gating_residual", False):
      self.router.enable_gating_residual(rngs=rngs, param_dtype=jnp.dtype(model.param_dtype))
    self.pool = nnx.data(None)     # the banks of the pool (`link`)
    self.pool_start = None

  @classmethod
  def check_config(cls, model: ml_collections.ConfigDict) -> None:
    super().check_config(model)
    refuse_options(model, _OWN_BANK_OPTIONS, "rexmoe")
    r = model.moe.get("reuse_range", 1)
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
      raise ConfigError("model.moe.reuse_range", r,
                        "an integer >= 0 (MoE layers on each side whose experts a router may "
                        "choose; 0: its own only)")

  def link(self, moe_layers: list, index: int) -> None:
    """Keeps the banks of MoE layers [s, s + W) (`pool_window`) as this layer's pool (and
    links the router as `MoELayer.link`)."""
    super().link(moe_layers, index)
    if len(moe_layers) != self.num_moe_layers:
      raise ValueError(f"rexmoe: the model has {len(moe_layers)} MoE layers, the config "
                       f"{self.num_moe_layers}")
    start, width = pool_window(index, len(moe_layers), self.reuse_range)
    for layer in moe_layers[start:start + width]:
      if not isinstance(layer, ReXMoELayer):
        raise ConfigError("model.moe.layer", type(layer).__name__,
                          "'rexmoe' for every MoE layer a rexmoe layer reuses")
    self.pool = nnx.List([layer.experts for layer in moe_layers[start:start + width]])
    self.pool_start = start

  def expert_weights(self) -> dict:
    """The pool's weights {name: [W E, D, F] / [W E, F, D]}: the W banks in depth order."""
    if self.pool is None:
      raise ValueError("rexmoe: the layer has no pool yet; the Transformer builds it with "
                       "link(moe_layers, index) once all its blocks exist")
    return {n: jnp.concatenate([bank.w[n][...] for bank in self.pool], axis=0)
            for n in self.experts.w}
