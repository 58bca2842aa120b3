"""THOR: stochastic experts with a consistency regulariser ("Taming Sparsely Activated
Transformer with Stochastic Experts", Zuo et al. 2021, arXiv:2110.04260)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.errors import ConfigError
from moejax.moe.routing.base import ROUTERS, Router, top_k_lowest_index


@ROUTERS.register("thor")
class THORRouter(Router):
  """THOR's stochastic experts (Zuo et al. 2021, arXiv:2110.04260). No gate: at training every token goes to two experts drawn uniformly at random (distinct),
  each with gate 1/2, and the layer adds the consistency loss

    consistency_weight * mean_t ||y_t^(1) - y_t^(2)||^2 / D

  between the two experts' outputs (`slot_loss`; the layer computes the slots' outputs apart
  when `per_slot_outputs` is set). The paper regularises the two forward passes' predictions
  with a symmetric KL (eq. 2); this is its layer-local form, one forward pass with both draws.
  At evaluation each token uses one random expert from the fixed key `eval_seed`, as the
  paper's inference (sec. 3); the second slot is empty. `model.moe.top_k` must be 2.
  """
  has_gate = False
  per_slot_outputs = True

  def __init__(self, d_model: int, num_experts: int, top_k: int, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32, consistency_weight: float = 1.0, eval_seed: int = 0,
               **common):
    if top_k != 2:
      raise ConfigError("model.moe.top_k", top_k, "2 (times granularity 1) for router 'thor': "
                        "two stochastic experts per token")
    if not (isinstance(consistency_weight, (int, float)) and consistency_weight >= 0):
      raise ConfigError("model.moe.router_args.consistency_weight", consistency_weight,
                        "a number >= 0")
    super().__init__(d_model, num_experts, top_k, rngs=rngs, param_dtype=param_dtype, **common)
    self.consistency_weight, self.eval_seed = float(consistency_weight), int(eval_seed)

  def decide(self, logits, *, train, rng, token_ids):
    """logits [T, E] (zeros) -> (expert_index [T, 2], combine_weights [T, 2], probs [T, E])."""
    del token_ids
    e = self.num_experts
    key = rng if (train and rng is not None) else jax.random.key(self.eval_seed)
    _, index = top_k_lowest_index(jax.random.uniform(key, logits.shape), 2)
    if train:
      weights = jnp.full(index.shape, 0.5, jnp.float32)
    else:
      index = index.at[:, 1].set(e)
      weights = jnp.array([1.0, 0.0], jnp.float32) * jnp.ones_like(index, jnp.float32)
    probs = jnp.sum(jax.nn.one_hot(index, e, dtype=jnp.float32) * weights[..., None], axis=1)
    return index, weights, probs

  def slot_loss(self, y_slots: jax.Array, token_mask: jax.Array) -> jax.Array:
    """y_slots: [2, T, D] the two experts' outputs, token_mask: [T] -> the weighted
    consistency loss (a scalar)."""
    diff = jnp.mean(jnp.square(y_slots[0].astype(jnp.float32) - y_slots[1].astype(jnp.float32)),
                    axis=-1)
    m = token_mask.astype(jnp.float32)
    return self.consistency_weight * jnp.sum(diff * m) / jnp.maximum(jnp.sum(m), 1.0)
