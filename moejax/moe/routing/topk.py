"""Token-choice top-k routers: softmax (GShard, Mixtral), sigmoid (DeepSeek-V3), Switch top-1.

All three accept loss-free balancing (`bias_update_rate`, `Router.select`) and SonicMoE's token
rounding (`token_rounding` = m > 0, `round_group_sizes_down`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.errors import ConfigError
from moejax.moe.routing.base import ROUTERS, Router

_SOFTMAX_ORDERS = ("before", "after")


@ROUTERS.register("topk")
class TopKRouter(Router):
  """Token-choice top-k with softmax scores.

  softmax_order="before": probabilities over all E experts, then the top-k of them are the
  combine weights (GShard, Lepikhin et al. 2020, arXiv:2006.16668; renormalize=True rescales them
  to sum to 1). softmax_order="after": top-k of the logits, softmax over those k (Mixtral of
  Experts, Jiang et al. 2024, arXiv:2401.04088) - the same as "before" with renormalize=True.
  """

  selection_bias = True

  def __init__(self, d_model: int, num_experts: int, top_k: int, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32, softmax_order: str = "before",
               renormalize: bool = False, token_rounding: int = 0, **common):
    if softmax_order not in _SOFTMAX_ORDERS:
      raise ConfigError("model.moe.router_args.softmax_order", softmax_order,
                        f"one of {_SOFTMAX_ORDERS}")
    super().__init__(d_model, num_experts, top_k, rngs=rngs, param_dtype=param_dtype, **common)
    self.softmax_order, self.renormalize = softmax_order, renormalize
    self.token_rounding = _check_rounding(token_rounding)

  def decide(self, logits, *, train, rng, token_ids):
    """logits [T, E] -> (expert_index [T, K], combine_weights [T, K], probs [T, E])."""
    del train, rng, token_ids
    probs = jax.nn.softmax(logits, axis=-1)
    weights, index = self.select(probs, self.top_k)
    if self.softmax_order == "after":
      weights = jax.nn.softmax(jnp.take_along_axis(logits, index, axis=-1), axis=-1)
    elif self.renormalize:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return (*_rounded(index, weights, self.num_experts, self.token_rounding), probs)


@ROUTERS.register("sigmoid")
class SigmoidRouter(Router):
  """Token-choice top-k with sigmoid affinities, normalised over the chosen k (DeepSeek-V3,
  arXiv:2412.19437, eqs. 13-15). `router_probs` are the affinities normalised over all E."""

  selection_bias = True

  def __init__(self, d_model: int, num_experts: int, top_k: int, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32, renormalize: bool = True, token_rounding: int = 0,
               **common):
    super().__init__(d_model, num_experts, top_k, rngs=rngs, param_dtype=param_dtype, **common)
    self.renormalize = renormalize
    self.token_rounding = _check_rounding(token_rounding)

  def decide(self, logits, *, train, rng, token_ids):
    """logits [T, E] -> (expert_index [T, K], combine_weights [T, K], probs [T, E])."""
    del train, rng, token_ids
    scores = jax.nn.sigmoid(logits)
    weights, index = self.select(scores, self.top_k)
    if self.renormalize:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return (*_rounded(index, weights, self.num_experts, self.token_rounding),
            scores / jnp.sum(scores, axis=-1, keepdims=True))


@ROUTERS.register("switch")
class SwitchRouter(TopKRouter):
  """Switch Transformer top-1 router (Fedus et al. 2021, arXiv:2101.03961): softmax before the
  top-1, the chosen probability as the combine weight, and multiplicative jitter noise
  x * U(1 - jitter_noise, 1 + jitter_noise) on the router input during training (sec. 2.4)."""

  def __init__(self, d_model: int, num_experts: int, top_k: int = 1, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32, jitter_noise: float = 0.01, token_rounding: int = 0,
               **common):
    if top_k != 1:
      raise ConfigError("model.moe.top_k", top_k,
                        "1 (times granularity 1) for router 'switch'; use router 'topk' for more")
    if not 0 <= jitter_noise < 1:
      raise ConfigError("model.moe.router_args.jitter_noise", jitter_noise, "a number in [0, 1)")
    super().__init__(d_model, num_experts, 1, rngs=rngs, param_dtype=param_dtype,
                     token_rounding=token_rounding, **common)
    self.jitter_noise = jitter_noise

  def logits(self, x, *, train, rng):
    """x: [T, D] -> logits [T, E]; jittered input when training with a key."""
    x = x.astype(jnp.float32)
    if train and self.jitter_noise > 0 and rng is not None:
      x = x * jax.random.uniform(rng, x.shape, jnp.float32,
                                 1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
    return super().logits(x, train=train, rng=None)


def _check_rounding(m) -> int:
  if not (isinstance(m, int) and not isinstance(m, bool) and m >= 0):
    raise ConfigError("model.moe.router_args.token_rounding", m,
                      "an integer >= 0 (rows of a grouped-matmul tile; 0: off)")
  return m


def _rounded(expert_index, weights, num_experts: int, tile: int):
  return ((expert_index, weights) if tile == 0 else
          round_group_sizes_down(expert_index, weights, num_experts, tile))


def round_group_sizes_down(expert_index: jax.Array, scores: jax.Array, num_experts: int,
                           tile: int) -> tuple[jax.Array, jax.Array]:
  """Token rounding ("SonicMoE: Accelerating MoE with IO and Tile-aware Optimizations", Guo et
  al. 2025, arXiv:2512.14080): each expert's group size n_e becomes floor(n_e / m) * m, a whole
  number of grouped-matmul tiles of m rows, so no tile is padded. The n_e mod m copies taken
  from expert e are its lowest-scored ones (ties: the later token goes); they become "no
  expert" slots (index E, weight 0) and the token keeps its other experts and its residual.

  The paper also rounds up, filling a tile with the highest-scored tokens the expert did not
  get; that adds copies beyond a token's K slots and is left out here.

  Args:
    expert_index: [T, K] int32 (E: no expert); scores: [T, K] the copies' combine weights.
  Returns:
    (expert_index [T, K], scores [T, K]) with the removed copies set to (E, 0).
  """
  t, k = expert_index.shape
  flat_e, flat_s = expert_index.reshape(-1), scores.reshape(-1).astype(jnp.float32)
  order = jnp.lexsort((jnp.arange(t * k), -flat_s, flat_e))      # by expert, best score first
  sizes = jnp.bincount(flat_e, length=num_experts + 1)             # [E + 1], sentinel last
  starts = jnp.cumsum(sizes) - sizes
  rank = jnp.zeros((t * k,), jnp.int32).at[order].set(
      jnp.arange(t * k, dtype=jnp.int32) - starts[flat_e[order]].astype(jnp.int32))
  keep_n = (sizes // tile) * tile
  kept = (rank < keep_n[flat_e]) & (flat_e < num_experts)
  index = jnp.where(kept, flat_e, num_experts).reshape(t, k)
  return index.astype(jnp.int32), jnp.where(kept, flat_s, 0.0).reshape(t, k)
