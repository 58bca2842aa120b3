"""Cosine routing on a low-dimensional hypersphere with a learned temperature (X-MoE).

"On the Representation Collapse of Sparse Mixture of Experts", Chi et al. 2022,
arXiv:2204.09179:

  s_e(x) = cos(W_p x, w_e) / tau = <W_p x / |W_p x|, w_e / |w_e|> / tau

with W_p [D, d_r] projecting the token to d_r << D dimensions, w_e [d_r] the expert embedding,
and tau a learned temperature (initialised 0.07). Then softmax and top-k as the linear gate.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.errors import ConfigError
from moejax.moe.routing.base import ROUTERS
from moejax.moe.routing.topk import TopKRouter
from moejax.params import logical_param

# 1/tau at most 100 (tau >= 0.01), the clamp of CLIP's learned logit scale that cosine gates
# (Tutel's CosineTopKGate) also use, so the logits stay bounded while tau is learned.
MAX_INV_TEMPERATURE = 100.0
_EPS = 1e-6


def cosine_logits(x: jax.Array, proj: jax.Array, expert_embed: jax.Array,
                  log_inv_temperature: jax.Array) -> jax.Array:
  """X-MoE routing scores cos(W_p x, w_e) / tau, in float32.

  Args:
    x: [T, D]; proj: W_p [D, d_r]; expert_embed: [d_r, E]; log_inv_temperature: scalar
    log(1/tau), clamped at log(100).
  Returns:
    logits [T, E], |logits| <= 1/tau.
  """
  h = jnp.dot(x.astype(jnp.float32), proj.astype(jnp.float32))                # [T, d_r]
  h = h / jnp.maximum(jnp.linalg.norm(h, axis=-1, keepdims=True), _EPS)
  w = expert_embed.astype(jnp.float32)
  w = w / jnp.maximum(jnp.linalg.norm(w, axis=0, keepdims=True), _EPS)
  scale = jnp.exp(jnp.minimum(log_inv_temperature.astype(jnp.float32),
                              math.log(MAX_INV_TEMPERATURE)))
  return jnp.dot(h, w) * scale


@ROUTERS.register("cosine")
class CosineRouter(TopKRouter):
  """X-MoE cosine router (Chi et al. 2022, arXiv:2204.09179): logits cos(W_p x, w_e) / tau on
  a `routing_dim`-dimensional sphere (default max(1, E // 2)), tau learned as log(1/tau) from
  `temperature` (its initial value, default 0.07), 1/tau clamped at 100. Softmax and top-k follow `topk` (its `softmax_order`, `renormalize`,
  `token_rounding`), and so does loss-free balancing (`selection_bias`).
  """

  has_gate = False       # no linear gate W [D, E]: W_p, w_e and tau below replace it

  def __init__(self, d_model: int, num_experts: int, top_k: int, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32, routing_dim: int | None = None,
               temperature: float = 0.07, **kwargs):
    routing_dim = max(1, num_experts // 2) if routing_dim is None else routing_dim
    if not (isinstance(routing_dim, int) and not isinstance(routing_dim, bool)
            and routing_dim >= 1):
      raise ConfigError("model.moe.router_args.routing_dim", routing_dim,
                        "an integer >= 1, or None: max(1, E // 2)")
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
            and 1 / MAX_INV_TEMPERATURE <= temperature):
      raise ConfigError("model.moe.router_args.temperature", temperature,
                        f"a number >= {1 / MAX_INV_TEMPERATURE} (the initial tau)")
    super().__init__(d_model, num_experts, top_k, rngs=rngs, param_dtype=param_dtype, **kwargs)
    self.gate = None
    self.proj = logical_param(rngs, (d_model, routing_dim), d_model ** -0.5, ("embed", None),
                              param_dtype)
    self.expert_embed = logical_param(rngs, (routing_dim, num_experts), 1.0, (None, "expert"),
                                      param_dtype)
    # [1], not a scalar: every parameter has a leading axis (initialisers and tests rely on it).
    self.log_inv_temperature = nnx.Param(jnp.full((1,), math.log(1 / temperature), jnp.float32),
                                         out_sharding=(None,), eager_sharding=False)

  def logits(self, x, *, train, rng):
    """x: [T, D] -> logits [T, E] in float32, |logits| <= 1/tau."""
    del train, rng
    return cosine_logits(x, self.proj[...], self.expert_embed[...],
                         self.log_inv_temperature[...][0])
