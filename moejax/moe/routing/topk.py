"""Token-choice top-k routers: softmax (GShard, Mixtral), sigmoid (DeepSeek-V3), Switch top-1."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.errors import ConfigError
from moejax.moe.routing.base import ROUTERS, Router, top_k_lowest_index

_SOFTMAX_ORDERS = ("before", "after")


@ROUTERS.register("topk")
class TopKRouter(Router):
  """Token-choice top-k with softmax scores.

  softmax_order="before": probabilities over all E experts, then the top-k of them are the
  combine weights (GShard, Lepikhin et al. 2020, arXiv:2006.16668; renormalize=True rescales them
  to sum to 1). softmax_order="after": top-k of the logits, softmax over those k (Mixtral of
  Experts, Jiang et al. 2024, arXiv:2401.04088) - the same as "before" with renormalize=True.
  """

  def __init__(self, d_model: int, num_experts: int, top_k: int, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32, softmax_order: str = "before",
               renormalize: bool = False):
    if softmax_order not in _SOFTMAX_ORDERS:
      raise ConfigError("model.moe.router_args.softmax_order", softmax_order,
                        f"one of {_SOFTMAX_ORDERS}")
    super().__init__(d_model, num_experts, top_k, rngs=rngs, param_dtype=param_dtype)
    self.softmax_order, self.renormalize = softmax_order, renormalize

  def decide(self, logits, *, train, rng):
    """logits [T, E] -> (expert_index [T, K], combine_weights [T, K], probs [T, E])."""
    del train, rng
    probs = jax.nn.softmax(logits, axis=-1)
    if self.softmax_order == "after":
      top_logits, index = top_k_lowest_index(logits, self.top_k)
      return index, jax.nn.softmax(top_logits, axis=-1), probs
    weights, index = top_k_lowest_index(probs, self.top_k)
    if self.renormalize:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return index, weights, probs


@ROUTERS.register("sigmoid")
class SigmoidRouter(Router):
  """Token-choice top-k with sigmoid affinities, normalised over the chosen k (DeepSeek-V3,
  arXiv:2412.19437, eqs. 13-15). `router_probs` are the affinities normalised over all E."""

  def __init__(self, d_model: int, num_experts: int, top_k: int, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32, renormalize: bool = True):
    super().__init__(d_model, num_experts, top_k, rngs=rngs, param_dtype=param_dtype)
    self.renormalize = renormalize

  def decide(self, logits, *, train, rng):
    """logits [T, E] -> (expert_index [T, K], combine_weights [T, K], probs [T, E])."""
    del train, rng
    scores = jax.nn.sigmoid(logits)
    weights, index = top_k_lowest_index(scores, self.top_k)
    if self.renormalize:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return index, weights, scores / jnp.sum(scores, axis=-1, keepdims=True)


@ROUTERS.register("switch")
class SwitchRouter(TopKRouter):
  """Switch Transformer top-1 router (Fedus et al. 2021, arXiv:2101.03961): softmax before the
  top-1, the chosen probability as the combine weight, and multiplicative jitter noise
  x * U(1 - jitter_noise, 1 + jitter_noise) on the router input during training (sec. 2.4)."""

  def __init__(self, d_model: int, num_experts: int, top_k: int = 1, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32, jitter_noise: float = 0.01):
    if top_k != 1:
      raise ConfigError("model.moe.top_k", top_k,
                        "1 (times granularity 1) for router 'switch'; use router 'topk' for more")
    if not 0 <= jitter_noise < 1:
      raise ConfigError("model.moe.router_args.jitter_noise", jitter_noise, "a number in [0, 1)")
    super().__init__(d_model, num_experts, 1, rngs=rngs, param_dtype=param_dtype)
    self.jitter_noise = jitter_noise

  def logits(self, x, *, train, rng):
    """x: [T, D] -> logits [T, E]; jittered input when training with a key."""
    x = x.astype(jnp.float32)
    if train and self.jitter_noise > 0 and rng is not None:
      x = x * jax.random.uniform(rng, x.shape, jnp.float32,
                                 1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
    return super().logits(x, train=train, rng=None)
