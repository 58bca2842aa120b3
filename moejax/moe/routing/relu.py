"""ReMoE: ReLU routing with an adaptively weighted L1 penalty ("ReMoE: Fully Differentiable
Mixture-of-Experts with ReLU Routing", Wang et al. 2024, arXiv:2412.14711)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.errors import ConfigError
from moejax.moe.routing.base import ROUTERS, Router, RouterState


@ROUTERS.register("relu")
class ReLURouter(Router):
  """ReMoE's router (Wang et al. 2024, arXiv:2412.14711). ReLU gates R_{t,e} = relu(x_t . w_e): an expert computes a token when its gate is
  positive, so a token gets 0..E experts and the gates are differentiable everywhere (sec. 3.1).
  Sparsity is steered by an L1 penalty refined by the load (eq. 7),

    L_reg = sum_e f_e * mean_t R_{t,e},   f_e = E / (K T) * #{t: R_{t,e} > 0},

  weighted by lambda, which adapts after each step towards the target sparsity 1 - K/E (eq. 6):

    lambda <- lambda * alpha ** sign((1 - K/E) - S),  S = the batch's fraction of zero gates.

  lambda is `RouterState` (no gradient, checkpointed). The loss lambda * L_reg is returned as
  `router_loss`. Metrics: `relu_sparsity` (S) and `relu_l1_coef` (lambda). Slots: E.
  """
  def __init__(self, d_model: int, num_experts: int, top_k: int, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32, l1_coef_init: float = 1e-8, l1_coef_rate: float = 1.2,
               **common):
    field = "model.moe.router_args."
    if not (isinstance(l1_coef_init, (int, float)) and l1_coef_init > 0):
      raise ConfigError(field + "l1_coef_init", l1_coef_init, "a number > 0")
    if not (isinstance(l1_coef_rate, (int, float)) and l1_coef_rate > 1):
      raise ConfigError(field + "l1_coef_rate", l1_coef_rate, "a number > 1 (alpha of eq. 6)")
    super().__init__(d_model, num_experts, top_k, rngs=rngs, param_dtype=param_dtype, **common)
    self.log_l1_coef = RouterState(jnp.full((), math.log(l1_coef_init), jnp.float32))
    self.log_rate = math.log(l1_coef_rate)
    self.target_sparsity = 1.0 - top_k / num_experts

  @property
  def num_slots(self) -> int:
    return self.num_experts

  def decide(self, logits, *, train, rng, token_ids):
    """logits [T, E] -> (expert_index [T, E], gates [T, E], probs [T, E])."""
    del train, rng, token_ids
    gates = jax.nn.relu(logits)
    e = self.num_experts
    index = jnp.where(gates > 0, jnp.arange(e, dtype=jnp.int32), e)
    total = jnp.sum(gates, axis=-1, keepdims=True)
    probs = jnp.where(total > 0, gates / jnp.where(total > 0, total, 1.0), 1.0 / e)
    return index, gates, probs

  def extra_losses(self, logits, probs, expert_index, combine_weights, token_mask) -> dict:
    """lambda * L_reg (eq. 7) and the sparsity S, over the routed tokens."""
    del logits, probs
    m = token_mask.astype(jnp.float32)[:, None]
    count = jnp.maximum(jnp.sum(m), 1.0)
    active = (expert_index < self.num_experts).astype(jnp.float32) * m           # [T, E]
    f = self.num_experts / (self.top_k * count) * jnp.sum(active, axis=0)         # [E]
    l1 = jnp.sum(jax.lax.stop_gradient(f) * jnp.sum(combine_weights * m, axis=0) / count)
    sparsity = 1.0 - jnp.sum(active) / (count * self.num_experts)
    coef = jnp.exp(jax.lax.stop_gradient(self.log_l1_coef[...]))
    return {"router_loss": coef * l1, "relu_sparsity": sparsity, "relu_l1_coef": coef}

  def update_state(self, metrics: dict) -> None:
    """lambda <- lambda * alpha ** sign(target - S) (eq. 6), S over the global batch."""
    super().update_state(metrics)
    step = jnp.sign(self.target_sparsity - metrics["relu_sparsity"])
    self.log_l1_coef[...] = self.log_l1_coef[...] + self.log_rate * step
