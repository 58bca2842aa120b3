"""Expert-choice routing: each expert picks its tokens, not the other way round.

"Mixture-of-Experts with Expert Choice Routing", Zhou et al. 2022, arXiv:2202.09368:

  S = softmax(X W_g)                 [T, E]  token-to-expert affinities (softmax over experts)
  G, I = TopK(S^T, C)                [E, C]  expert e takes the C tokens with the highest S[:, e]
  C = round(c * T * K / E)                   c the capacity factor, K the config's top-k

so every expert processes exactly C tokens (MaxVio 0, no auxiliary loss needed) and a token gets
any number of experts, 0..E. The output of token t is sum over the experts e that chose it of
S[t, e] * FFN_e(x_t).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.errors import ConfigError
from moejax.moe.routing.base import ROUTERS, Router


def expert_capacity(num_tokens: int, num_experts: int, top_k: int,
                    capacity_factor: float) -> int:
  """C = round(c * T * K / E) (half up), at least 1 and at most T."""
  return min(num_tokens, max(1, int(capacity_factor * num_tokens * top_k / num_experts + 0.5)))


def expert_choice(probs: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
  """Each expert takes its top-`capacity` tokens by its column of `probs`.

  Args:
    probs: [T, E] float32 affinities.
    capacity: C, tokens per expert.
  Returns:
    (expert_index [T, E] int32: slot e holds e if expert e chose the token, else E;
     combine_weights [T, E] float32: probs[t, e] in the chosen slots, else 0).
  `jax.lax.top_k` is stable, so ties go to the lower token index.
  """
  t, e = probs.shape
  _, tokens = jax.lax.top_k(probs.T, capacity)                                 # [E, C]
  chosen = jnp.zeros((e, t), bool).at[jnp.arange(e)[:, None], tokens].set(True).T   # [T, E]
  index = jnp.where(chosen, jnp.arange(e, dtype=jnp.int32)[None, :], e)
  return index.astype(jnp.int32), jnp.where(chosen, probs, 0.0)


@ROUTERS.register("expert_choice")
class ExpertChoiceRouter(Router):
  """Expert-choice routing (Zhou et al. 2022, arXiv:2202.09368): expert e takes the C tokens
  with the highest softmax affinity S[t, e], C = round(capacity_factor * T * top_k / E).

  K = E slots per token (slot e: expert e or the sentinel E). Not causal (a token's experts
  depend on later tokens of the batch) and batch-dependent (on the other sequences too): an
  autoregressive decoder cannot use it as is (as the paper's limitations say). Padding tokens
  compete for the C places like any token and are then dropped, so with padding an expert may
  get fewer than C real tokens. It fixes each expert's load itself, so only dropless dispatch is allowed.
  """

  causal = False
  batch_independent = False
  dispatch_modes = ("dropless",)

  def __init__(self, d_model: int, num_experts: int, top_k: int, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32, capacity_factor: float = 1.0, **common):
    if not (isinstance(capacity_factor, (int, float)) and not isinstance(capacity_factor, bool)
            and capacity_factor > 0):
      raise ConfigError("model.moe.router_args.capacity_factor", capacity_factor,
                        "a number > 0 (C = round(capacity_factor * T * top_k / E) tokens per "
                        "expert)")
    super().__init__(d_model, num_experts, top_k, rngs=rngs, param_dtype=param_dtype, **common)
    self.capacity_factor = float(capacity_factor)

  @property
  def num_slots(self) -> int:
    """E: a token may be chosen by every expert."""
    return self.num_experts

  def decide(self, logits, *, train, rng, token_ids):
    """logits [T, E] -> (expert_index [T, E], combine_weights [T, E], probs [T, E])."""
    del train, rng, token_ids
    probs = jax.nn.softmax(logits, axis=-1)
    capacity = expert_capacity(logits.shape[0], self.num_experts, self.top_k,
                               self.capacity_factor)
    return (*expert_choice(probs, capacity), probs)
