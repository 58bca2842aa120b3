"""Routers without a learned gate: hash routing and uniform random routing (a control)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.errors import ConfigError
from moejax.moe.routing.base import ROUTERS, Router, top_k_lowest_index


def _uniform_weights(index: jax.Array, num_experts: int):
  """Gates 1/K on the K chosen experts, and the matching [T, E] probabilities."""
  k = index.shape[-1]
  weights = jnp.full(index.shape, 1.0 / k, jnp.float32)
  probs = jnp.sum(jax.nn.one_hot(index, num_experts, dtype=jnp.float32), axis=1) / k
  return index, weights, probs


@ROUTERS.register("hash")
class HashRouter(Router):
  """Hash layers (Roller et al. 2021, "Hash Layers For Large Sparse Models", arXiv:2106.04426):
  each token id goes to a fixed expert, with no gate parameters. The hash is a balanced random
  one (sec. 3, "Random Hash" made balanced): a fixed permutation pi of the V ids (from
  `hash_seed`) and h(v) = pi(v) mod E, so every expert owns V/E ids (within one). Top-K > 1
  takes experts h(v), h(v)+1, ..., h(v)+K-1 (mod E), still balanced, with gates 1/K.
  The routing depends on the token id alone: causal, batch-independent, unchanged by training.
  """
  has_gate = False

  def __init__(self, d_model: int, num_experts: int, top_k: int, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32, hash_seed: int = 0, **common):
    super().__init__(d_model, num_experts, top_k, rngs=rngs, param_dtype=param_dtype, **common)
    if not self.vocab_size:
      raise ConfigError("model.vocab_size", self.vocab_size, "a positive vocabulary size for "
                        "router 'hash' (it hashes token ids)")
    self.hash_seed = int(hash_seed)

  def expert_of_token(self, token_ids: jax.Array) -> jax.Array:
    """token_ids [...] int -> the first expert h(v) [...] int32."""
    rank = jnp.argsort(jax.random.permutation(jax.random.key(self.hash_seed), self.vocab_size))
    return (rank[token_ids] % self.num_experts).astype(jnp.int32)

  def decide(self, logits, *, train, rng, token_ids):
    """token_ids [T] -> (expert_index [T, K], combine_weights [T, K], probs [T, E])."""
    del logits, train, rng
    if token_ids is None:
      raise ValueError("router 'hash' routes by token id: call the layer with token_ids")
    first = self.expert_of_token(token_ids)[:, None]
    index = (first + jnp.arange(self.top_k, dtype=jnp.int32)) % self.num_experts
    return _uniform_weights(index, self.num_experts)


@ROUTERS.register("random")
class RandomRouter(Router):
  """Uniform random routing, the control of routing studies (e.g. Roller et al. 2021,
  arXiv:2106.04426, sec. 5; Zuo et al. 2021, arXiv:2110.04260): K distinct experts drawn
  uniformly per token, gates 1/K. Training draws from the step's key; evaluation (or no key)
  from the fixed key `eval_seed`, so evaluation is deterministic. A token's experts depend on
  its position in the batch, never on the other tokens' content.
  """
  has_gate = False

  def __init__(self, d_model: int, num_experts: int, top_k: int, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32, eval_seed: int = 0, **common):
    super().__init__(d_model, num_experts, top_k, rngs=rngs, param_dtype=param_dtype, **common)
    self.eval_seed = int(eval_seed)

  def decide(self, logits, *, train, rng, token_ids):
    """logits [T, E] (zeros) -> (expert_index [T, K], combine_weights [T, K], probs [T, E])."""
    del token_ids
    key = rng if (train and rng is not None) else jax.random.key(self.eval_seed)
    _, index = top_k_lowest_index(jax.random.uniform(key, logits.shape), self.top_k)
    return _uniform_weights(index, self.num_experts)
