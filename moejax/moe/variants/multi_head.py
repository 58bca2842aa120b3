"""MH-MoE: each token is split into h sub-tokens, each routed on its own through a sparse layer
of width D/h, and merged back.

"Multi-Head Mixture-of-Experts", Wu, Huang, Wang & Wei 2024, arXiv:2404.15045. Causal and
batch-independent exactly when the inner sparse layer is (its router and dispatch: see
`moejax.moe.routing.describe`): a sub-token is routed like any token.
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from moejax.errors import ConfigError
from moejax.moe.layer import MoEFFN, MoELayer
from moejax.moe.variants import MOE_LAYERS
from moejax.params import logical_param


def sub_token_config(model: ml_collections.ConfigDict, heads: int) -> ml_collections.ConfigDict:
  """A copy of `model` whose d_model is D/h: the config the inner sparse layer of MH-MoE is
  built from (its router W [D/h, E], its experts [E, D/h, F]); every other field is kept, so
  E, K, F and the shared experts follow `moejax.moe.moe_dims` as for the plain layer."""
  inner = model.copy_and_resolve_references()
  inner.d_model = model.d_model // heads
  return inner


@MOE_LAYERS.register("multi_head")
class MultiHeadMoE(MoEFFN):
  """MH-MoE ("Multi-Head Mixture-of-Experts", Wu et al. 2024, arXiv:2404.15045):
  with h = `model.moe.mh_heads` (default 2),
      X^ = X W_head                               W_head [D, D]  (the multi-head layer)
      x^_t = [x^_t,1 .. x^_t,h]                   h sub-tokens of width D/h per token
      o_t,j = MoE(x^_t,j)                         each sub-token routed on its own
      Y = [o_t,1 .. o_t,h] W_merge                W_merge [D, D] (the merge layer)
  MoE is `moejax.moe.layer.MoELayer` built from `sub_token_config` (d_model = D/h), so every
  router, dispatch, granularity and shared-expert option of the sparse layer applies to the
  sub-tokens. Each of the h sub-tokens runs K experts of width F on D/h inputs: the expert
  FLOPs of a top-K token, with 1/h of the expert parameters, plus 2 D^2 for the projections.

  Causal and batch-independent when the inner layer is. Metrics, auxiliary losses and the
  routing carry (over B * S * h sub-tokens) are the inner layer's: `load` [E] counts sub-token
  copies and `experts_per_token` is per sub-token (K: each of width F on D/h inputs).
  """

  @classmethod
  def check_config(cls, model: ml_collections.ConfigDict) -> None:
    heads = model.moe.get("mh_heads", 2)
    if (isinstance(heads, bool) or not isinstance(heads, int) or heads < 1
        or model.d_model % heads):
      raise ConfigError("model.moe.mh_heads", heads,
                        f"an integer >= 1 dividing model.d_model={model.d_model}")
    MoELayer.check_config(sub_token_config(model, heads))

  def __init__(self, model: ml_collections.ConfigDict, *, rngs: nnx.Rngs,
               mesh: Mesh | None = None):
    d, pd = model.d_model, jnp.dtype(model.param_dtype)
    self.heads = model.moe.get("mh_heads", 2)
    self.dtype = jnp.dtype(model.dtype)
    self.head = logical_param(rngs, (d, d), d ** -0.5, ("embed", None), pd)
    self.merge = logical_param(rngs, (d, d), d ** -0.5, (None, "embed"), pd)
    self.inner = MoELayer(sub_token_config(model, self.heads), rngs=rngs, mesh=mesh)
    # What the inner router is (moejax.moe.routing.describe); capacity dispatch drops copies
    # by their neighbours in a routing group (README, "Routers").
    router = type(self.inner.router)
    self.causal = router.causal
    self.batch_independent = router.batch_independent and model.moe.dispatch == "dropless"

  def update_state(self, metrics: dict) -> None:
    """The inner layer's router state moves with its metrics (which are this layer's)."""
    self.inner.update_state(metrics)

  def forward(self, x, segment_ids=None, *, train=False, rng=None, token_ids=None, carry=None):
    """x: [B, S, D], segment_ids and token_ids: [B, S], carry: the previous MoE layer's routing
    state over B * S * h sub-tokens -> (y [B, S, D], the inner layer's weighted aux loss,
    metrics and carry). Sub-token j of token s sits at position s h + j of the inner layer's
    [B, S h, D/h] input, and inherits the token's segment id and token id."""
    b, s, d = x.shape
    h = self.heads
    xh = jnp.einsum("bsd,de->bse", x.astype(self.dtype), self.head[...].astype(self.dtype))
    rep = lambda a: None if a is None else jnp.repeat(a, h, axis=1)
    y, aux_loss, metrics, carry = self.inner.forward(
        xh.reshape(b, s * h, d // h), rep(segment_ids), train=train, rng=rng,
        token_ids=rep(token_ids), carry=carry)
    y = jnp.einsum("bse,ed->bsd", y.reshape(b, s, d).astype(self.dtype),
                   self.merge[...].astype(self.dtype))
    return y.astype(x.dtype), aux_loss, metrics, carry
