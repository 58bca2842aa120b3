"""Top-p (dynamic) routing: a token takes the fewest experts whose probability reaches p.

"Harder Tasks Need More Experts: Dynamic Routing in MoE Models", Huang et al. 2024,
arXiv:2403.07652 (the method section):

  P = softmax(x W_r)                          [E]   router probabilities
  I = argsort(P, descending)
  t = min { k : sum_{j <= k} P_{I_j} >= p }          the smallest set reaching p
  S = { I_1, ..., I_t },   y = sum_{e in S} P_e * FFN_e(x)   (weights not renormalised)

plus a dynamic loss, the entropy of P, which pushes P to be sharp so that few experts
reach p. Static shapes need a maximum: t is capped at `max_k` slots here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.errors import ConfigError
from moejax.moe.routing.base import ROUTERS, Router, top_k_lowest_index


def top_p_select(probs: jax.Array, p: float, max_k: int) -> tuple[jax.Array, jax.Array]:
  """The smallest prefix of the experts sorted by probability (ties: lower index first) whose
  sum reaches p, at most `max_k` of them.

  Args:
    probs: [T, E] float32 probabilities.
  Returns:
    (expert_index [T, max_k] int32, E in unused slots; weights [T, max_k] float32, the chosen
    probabilities, 0 in unused slots).
  """
  values, index = top_k_lowest_index(probs, max_k)                             # [T, max_k]
  before = jnp.cumsum(values, axis=-1) - values        # probability of the better experts
  # Slot j is needed while the experts before it have not reached p; slot 0 always is (p > 0).
  keep = before < p
  return (jnp.where(keep, index, probs.shape[-1]).astype(jnp.int32),
          jnp.where(keep, values, 0.0))


@ROUTERS.register("top_p")
class TopPRouter(Router):
  """Dynamic top-p routing (Huang et al. 2024, arXiv:2403.07652): the fewest experts whose
  softmax probability sums to at least p, at most `max_k` (default 2 * top_k, capped at E);
  the weights are the chosen probabilities, not renormalised.

  `entropy_loss_weight` w > 0 adds the paper's dynamic loss w * mean_t H(P_t) as
  `router_loss`. Causal and batch-independent.
  """

  def __init__(self, d_model: int, num_experts: int, top_k: int, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32, p: float = 0.4, max_k: int | None = None,
               entropy_loss_weight: float = 0.0, **common):
    if not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0 < p <= 1):
      raise ConfigError("model.moe.router_args.p", p, "a number in (0, 1]")
    max_k = min(2 * top_k, num_experts) if max_k is None else max_k
    if not (isinstance(max_k, int) and not isinstance(max_k, bool) and 1 <= max_k <= num_experts):
      raise ConfigError("model.moe.router_args.max_k", max_k,
                        f"an integer in [1, {num_experts}] (the experts), or None: "
                        "min(2 * top_k, E)")
    if not (isinstance(entropy_loss_weight, (int, float)) and entropy_loss_weight >= 0):
      raise ConfigError("model.moe.router_args.entropy_loss_weight", entropy_loss_weight,
                        "a number >= 0")
    super().__init__(d_model, num_experts, top_k, rngs=rngs, param_dtype=param_dtype, **common)
    self.p, self.max_k = float(p), max_k
    self.entropy_loss_weight = float(entropy_loss_weight)

  @property
  def num_slots(self) -> int:
    """max_k: a token takes 1..max_k experts."""
    return self.max_k

  def decide(self, logits, *, train, rng, token_ids):
    """logits [T, E] -> (expert_index [T, max_k], combine_weights [T, max_k], probs [T, E])."""
    del train, rng, token_ids
    probs = jax.nn.softmax(logits, axis=-1)
    return (*top_p_select(probs, self.p, self.max_k), probs)

  def extra_losses(self, logits, probs, expert_index, combine_weights, token_mask) -> dict:
    """The dynamic (entropy) loss, weighted, when `entropy_loss_weight` > 0."""
    del logits, expert_index, combine_weights
    if self.entropy_loss_weight == 0:
      return {}
    m = token_mask.astype(jnp.float32)
    entropy = -jnp.sum(probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), axis=-1)
    return {"router_loss": self.entropy_loss_weight * jnp.sum(entropy * m)
            / jnp.maximum(jnp.sum(m), 1.0)}
