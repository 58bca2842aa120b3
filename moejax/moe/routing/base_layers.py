"""BASE layers: a balanced linear assignment of tokens to experts during training.

"BASE Layers: Simplifying Training of Large, Sparse Models", Lewis et al. 2021,
arXiv:2103.16716:

  training:   maximise  sum_t h_t . w_{a_t}   over assignments a: [T] -> [E]
              subject to |{t : a_t = e}| = T / E for every expert e          (1)
  evaluation: a_t = argmax_e h_t . w_e   (greedy, no balance)
  output:     x_t + sigmoid(h_t . w_{a_t}) * FFN_{a_t}(h_t)                 (2)

The paper solves (1) exactly with an auction algorithm. Here it is solved approximately, in
JAX, as in S-BASE ("Unified Scaling Laws for Routed Language Models", Clark et al. 2022,
arXiv:2202.01169): entropic optimal transport by Sinkhorn iterations gives a soft
plan with row sums 1 and column sums T/E, which an exact rounding turns into a balanced
assignment:

  1. Sinkhorn in the log domain on the standardised scores s = (l - mean l) / std l, with the
     temperature annealed geometrically from 1 to `sinkhorn_temperature` over
     `sinkhorn_iters` iterations (epsilon scaling), giving log P[t, e] = (s + f_t + g_e) / eps.
  2. Rounding in at most E rounds: every unassigned token proposes to its best expert by P
     among those with room left; each expert accepts its proposers with the highest P up to its
     remaining room (ties: lower token index). A round either places every proposer or fills an
     expert, so E rounds place every token and every expert gets exactly T/E.

Tolerance (the defaults, 400 iterations down to temperature 0.001), measured against
`scipy.optimize.linear_sum_assignment` (each expert replicated T/E times) on random N(0, 1)
scores, T x E from 16 x 4 to 512 x 8, 10 seeds each: the optimum's gain over the mean score,
sum_t l[t, a_t] - T * mean(l), is reached within 1% (worst case seen 0.45%, mean 0.03%; 83% of
the cases exactly optimal). tests/test_routers_assignment.py asserts the 1%. Fewer iterations
or a higher temperature trade optimality for speed (100 / 0.01: mean 0.4%, worst 7%).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.errors import ConfigError
from moejax.moe.routing.base import ROUTERS, Router, top_k_lowest_index


def sinkhorn_log_plan(scores: jax.Array, capacity: int, iters: int,
                      temperature: float) -> jax.Array:
  """log of the entropic transport plan with row sums 1 and column sums `capacity`.

  Args:
    scores: [T, E] float32 (the larger, the better).
    capacity: T / E.
  Returns:
    log P [T, E] float32 (only its order matters to the rounding).
  """
  s = scores - jnp.mean(scores)
  s = s / jnp.maximum(jnp.std(s), 1e-6)
  log_cap = jnp.log(jnp.float32(capacity))
  # eps_i = temperature ** (i / (iters - 1)): from 1 down to `temperature`.
  decay = jnp.float32(temperature) ** (1.0 / max(iters - 1, 1))

  def step(i, carry):
    f, g = carry
    eps = decay ** i.astype(jnp.float32)
    f = -eps * jax.nn.logsumexp((s + g[None, :]) / eps, axis=1)                 # rows: 1
    g = eps * log_cap - eps * jax.nn.logsumexp((s + f[:, None]) / eps, axis=0)  # columns: T/E
    return f, g

  f, g = jax.lax.fori_loop(0, iters, step, (jnp.zeros(s.shape[0]), jnp.zeros(s.shape[1])))
  eps = jnp.float32(temperature)
  return (s + f[:, None] + g[None, :]) / eps


def balanced_rounding(log_plan: jax.Array, capacity: int) -> jax.Array:
  """An assignment with exactly `capacity` tokens per expert, following the plan.

  Args:
    log_plan: [T, E] float32 preferences (finite); T = capacity * E.
  Returns:
    expert [T] int32.
  """
  t, e = log_plan.shape
  tokens = jnp.arange(t)

  def one_round(_, carry):
    assigned, room = carry                                                     # [T], [E]
    pref = jnp.where(room[None, :] > 0, log_plan, -jnp.inf)
    choice = jnp.argmax(pref, axis=-1).astype(jnp.int32)                       # [T]
    proposing = assigned < 0
    key = jnp.where(proposing, jnp.take_along_axis(log_plan, choice[:, None], axis=1)[:, 0],
                    -jnp.inf)
    # Rank of each proposer among those to the same expert: best plan value first.
    group = jnp.where(proposing, choice, e)
    order = jnp.lexsort((tokens, -key, group))
    sizes = jnp.bincount(group, length=e + 1)
    starts = jnp.cumsum(sizes) - sizes
    rank = jnp.zeros((t,), jnp.int32).at[order].set(
        (jnp.arange(t) - starts[group[order]]).astype(jnp.int32))
    accept = proposing & (rank < room[choice])
    assigned = jnp.where(accept, choice, assigned)
    room = room - jnp.bincount(jnp.where(accept, choice, e), length=e + 1)[:e].astype(jnp.int32)
    return assigned, room

  assigned, _ = jax.lax.fori_loop(
      0, e, one_round, (jnp.full((t,), -1, jnp.int32), jnp.full((e,), capacity, jnp.int32)))
  return assigned


def balanced_assignment(scores: jax.Array, iters: int = 400,
                        temperature: float = 0.001) -> jax.Array:
  """BASE's balanced assignment ((1) above, arXiv:2103.16716), approximately maximising
  sum_t scores[t, a_t] with exactly T/E tokens per expert: Sinkhorn plan, then exact rounding.

  Args:
    scores: [T, E] float32, T a multiple of E.
  Returns:
    a [T] int32.
  """
  t, e = scores.shape
  assert t % e == 0, (f"router 'base' balances T={t} tokens over E={e} experts exactly and "
                      "needs T to be a multiple of E (set train.batch_size * train.seq_len "
                      "accordingly)")
  scores = jax.lax.stop_gradient(scores.astype(jnp.float32))
  return balanced_rounding(sinkhorn_log_plan(scores, t // e, iters, temperature), t // e)


@ROUTERS.register("base")
class BaseLayersRouter(Router):
  """BASE layers router (Lewis et al. 2021, arXiv:2103.16716), top-1: during training a
  balanced assignment (exactly T/E tokens per expert, `balanced_assignment`), at evaluation the
  greedy argmax; the combine weight is sigmoid(logit) of the assigned expert ((2) above).

  Not causal and batch-dependent during training (the assignment is over the whole batch);
  causal and batch-independent at evaluation. Padding tokens take places in the assignment
  and are then dropped, so with padding an expert may get fewer than T/E real tokens.
  """

  causal = False
  batch_independent = False

  def __init__(self, d_model: int, num_experts: int, top_k: int = 1, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32, sinkhorn_iters: int = 400,
               sinkhorn_temperature: float = 0.001, **common):
    if top_k != 1:
      raise ConfigError("model.moe.top_k", top_k,
                        "1 (times granularity 1) for router 'base', a one-expert assignment")
    if not (isinstance(sinkhorn_iters, int) and not isinstance(sinkhorn_iters, bool)
            and sinkhorn_iters >= 1):
      raise ConfigError("model.moe.router_args.sinkhorn_iters", sinkhorn_iters,
                        "an integer >= 1")
    if not (isinstance(sinkhorn_temperature, (int, float)) and 0 < sinkhorn_temperature <= 1):
      raise ConfigError("model.moe.router_args.sinkhorn_temperature", sinkhorn_temperature,
                        "a number in (0, 1] (final entropic temperature on standardised scores)")
    super().__init__(d_model, num_experts, 1, rngs=rngs, param_dtype=param_dtype, **common)
    self.sinkhorn_iters, self.sinkhorn_temperature = sinkhorn_iters, float(sinkhorn_temperature)

  def decide(self, logits, *, train, rng, token_ids):
    """logits [T, E] -> (expert_index [T, 1], combine_weights [T, 1], probs [T, E])."""
    del rng, token_ids
    if train:
      index = balanced_assignment(logits, self.sinkhorn_iters, self.sinkhorn_temperature)[:, None]
    else:
      _, index = top_k_lowest_index(logits, 1)
    weights = jax.nn.sigmoid(jnp.take_along_axis(logits, index, axis=-1))
    return index, weights, jax.nn.softmax(logits, axis=-1)
