"""Tests for the routers that do not give every token the same K experts or that balance the
load by construction: expert choice (each expert takes exactly C tokens), BASE layers (a balanced
assignment close to scipy's optimum), top-p (a variable number of experts per token) and X-MoE's
cosine router (bounded, scale-invariant logits). References are float64 numpy or scipy.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.optimize import linear_sum_assignment

from moejax.config import validate_model
from moejax.moe.layer import MoELayer
from moejax.moe.routing import ROUTERS
from moejax.moe.routing.base_layers import balanced_assignment
from moejax.moe.routing.cosine import MAX_INV_TEMPERATURE

from helpers import load_config

E = 4


def _softmax64(logits):
  z = np.asarray(logits, np.float64)
  z = np.exp(z - z.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def _identity_router(name, top_k, **args):
  """A router whose input is its logits (d_model == E, identity gate)."""
  router = ROUTERS[name](E, E, top_k, rngs=nnx.Rngs(0), **args)
  router.gate[...] = jnp.eye(E, dtype=jnp.float32)
  return router


def _route(router, x, train):
  """router(x) under jit (one compile per router and shape)."""
  graphdef, state = nnx.split(router)
  return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, train=train))(state, jnp.asarray(x))


# ---------------------------------------------------------------- expert choice (arXiv:2202.09368)

def _expert_choice_ref(logits, capacity):
  """float64: expert e takes the `capacity` tokens with the highest probability (lower index
  first on ties) -> (index [T, E], weights [T, E])."""
  probs = _softmax64(logits)
  t, e = probs.shape
  index, weights = np.full((t, e), e), np.zeros((t, e))
  for j in range(e):
    for tok in np.argsort(-probs[:, j], kind="stable")[:capacity]:
      index[tok, j], weights[tok, j] = j, probs[tok, j]
  return index, weights


# C = 2 places per expert for T = 8 tokens. Token e + 1 is expert e's favourite; tokens 0 and
# 5-7 have p = 1/4 everywhere and tie for every second place, which token 0 takes (lower token
# index first): it gets all E > top_k experts and tokens 5-7 get none.
EC_LOGITS = np.array([
    [0.0, 0.0, 0.0, 0.0],
    [2.0, 0.0, 0.0, 0.0],
    [0.0, 2.0, 0.0, 0.0],
    [0.0, 0.0, 2.0, 0.0],
    [0.0, 0.0, 0.0, 2.0],
    [0.0, 0.0, 0.0, 0.0],
    [1.0, 1.0, 1.0, 1.0],
    [-1.0, -1.0, -1.0, -1.0],
], np.float32)


@pytest.mark.parametrize("logits,top_k,capacity_factor,capacity", [
    (EC_LOGITS, 1, 1.0, 2),
    (np.random.default_rng(0).normal(size=(16, E)).astype(np.float32), 2, 1.5, 12),
])
def test_expert_choice_every_expert_takes_exactly_c_tokens(logits, top_k, capacity_factor,
                                                          capacity):
  router = _identity_router("expert_choice", top_k, capacity_factor=capacity_factor)
  routing = _route(router, logits, train=True)
  assert routing.expert_index.shape == (logits.shape[0], E) and router.num_slots == E
  np.testing.assert_array_equal(routing.group_sizes, [capacity] * E)
  assert float(routing.metrics["max_vio"]) == 0.0
  index, weights = _expert_choice_ref(logits, capacity)
  np.testing.assert_array_equal(routing.expert_index, index)
  np.testing.assert_allclose(routing.combine_weights, weights, rtol=1e-5, atol=1e-7)
  if logits is EC_LOGITS:
    counts = (np.asarray(routing.expert_index) < E).sum(-1)
    np.testing.assert_array_equal(counts, [E, 1, 1, 1, 1, 0, 0, 0])
    assert counts[0] > top_k
    assert index[0, 0] == 0 and index[5, 0] == E        # the tie goes to the lower token index


def test_expert_choice_allows_dropless_dispatch_only():
  cfg = load_config(**{"model.moe.router": "expert_choice", "model.moe.dispatch": "capacity"})
  with pytest.raises(Exception, match="model.moe.dispatch"):
    validate_model(cfg.model)
  with pytest.raises(Exception, match="router_args.capacity_factor"):
    ROUTERS["expert_choice"](E, E, 1, rngs=nnx.Rngs(0), capacity_factor=0)


# ---------------------------------------------------------------- BASE layers (arXiv:2103.16716)

# Random N(0, 1) scores; the docstring of moejax/moe/routing/base_layers.py states the tolerance.
BASE_CASES = [(16, 4), (32, 8), (64, 8)]
BASE_SEEDS = range(4)
BASE_TOLERANCE = 0.01       # of the optimum's gain over the mean score


def test_base_assignment_is_balanced_and_near_optimal():
  solve = jax.jit(balanced_assignment)
  gaps = []
  for t, e in BASE_CASES:
    for seed in BASE_SEEDS:
      scores = np.random.default_rng(seed).normal(size=(t, e)).astype(np.float32)
      a = np.asarray(solve(jnp.asarray(scores)))
      np.testing.assert_array_equal(np.bincount(a, minlength=e), [t // e] * e)
      square = np.repeat(scores.astype(np.float64), t // e, axis=1)   # each expert T/E times
      rows, cols = linear_sum_assignment(square, maximize=True)
      optimum = square[rows, cols].sum()
      ours = scores.astype(np.float64)[np.arange(t), a].sum()
      gain = optimum - t * scores.astype(np.float64).mean()
      gaps.append((optimum - ours) / gain)
  print(f"BASE gap to optimum (fraction of gain): mean {np.mean(gaps):.5f} "
        f"max {np.max(gaps):.5f}, exact {np.mean(np.array(gaps) < 1e-6):.2f}")
  assert max(gaps) <= BASE_TOLERANCE, gaps


def test_base_router_balances_at_training_and_is_greedy_at_eval():
  t = 32
  logits = np.random.default_rng(1).normal(size=(t, E)).astype(np.float32)
  logits[:, 0] += 3.0                               # greedy would send nearly all to expert 0
  router = _identity_router("base", 1)
  train = _route(router, logits, train=True)
  np.testing.assert_array_equal(train.group_sizes, [t // E] * E)
  assert float(train.metrics["max_vio"]) == 0.0
  chosen = np.asarray(train.expert_index)[:, 0]
  sig = 1 / (1 + np.exp(-logits.astype(np.float64)))
  np.testing.assert_allclose(train.combine_weights[:, 0], sig[np.arange(t), chosen], rtol=1e-5)
  evaluation = _route(router, logits, train=False)
  greedy = np.argmax(logits, axis=-1)
  np.testing.assert_array_equal(evaluation.expert_index[:, 0], greedy)
  np.testing.assert_allclose(evaluation.combine_weights[:, 0], sig[np.arange(t), greedy],
                             rtol=1e-5)
  assert float(evaluation.metrics["max_vio"]) > 0


def test_base_needs_tokens_a_multiple_of_experts():
  with pytest.raises(AssertionError, match="multiple of E"):
    balanced_assignment(jnp.zeros((6, E)))
  with pytest.raises(Exception, match="model.moe.top_k"):
    ROUTERS["base"](E, E, 2, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------- top-p (arXiv:2403.07652)

def _top_p_count_ref(logits, p, max_k):
  """float64: the fewest experts (by descending probability, lower index first on ties) whose
  probabilities sum to at least p, at most max_k."""
  probs = _softmax64(logits)
  counts = []
  for row in probs:
    cum = np.cumsum(np.sort(row, kind="stable")[::-1])
    counts.append(min(int(np.argmax(cum >= p - 1e-12)) + 1, max_k))
  return np.array(counts)


def test_top_p_takes_the_fewest_experts_reaching_p():
  t, e, p = 64, 8, 0.7
  logits = (1.5 * np.random.default_rng(2).normal(size=(t, e))).astype(np.float32)
  router = ROUTERS["top_p"](e, e, 2, rngs=nnx.Rngs(0), p=p)
  router.gate[...] = jnp.eye(e, dtype=jnp.float32)
  assert router.num_slots == 4                      # max_k = 2 * top_k
  routing = _route(router, logits, train=False)
  index = np.asarray(routing.expert_index)
  counts = (index < e).sum(-1)
  np.testing.assert_array_equal(counts, _top_p_count_ref(logits, p, 4))
  assert set(counts.tolist()) == {1, 2, 3, 4}, counts   # k varies per token
  probs = _softmax64(logits)
  expected = np.where(index < e, probs[np.arange(t)[:, None], np.minimum(index, e - 1)], 0.0)
  np.testing.assert_allclose(routing.combine_weights, expected, rtol=1e-5, atol=1e-7)
  chosen_mass = np.asarray(routing.combine_weights).sum(-1)
  assert ((chosen_mass >= p - 1e-6) | (counts == 4)).all()


def test_top_p_layer_reports_the_mean_number_of_experts():
  cfg = load_config(**{"model.moe.router": "top_p", "model.moe.router_args.p": 0.6,
                       "model.moe.num_experts": E})
  cfg.model.update(d_model=16, d_ff=32, vocab_size=32, num_heads=2, num_kv_heads=2,
                   head_dim=8)
  layer = MoELayer(cfg.model, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(3), (2, 16, 16), jnp.float32)
  graphdef, state = nnx.split(layer)

  @jax.jit
  def run(state, x):
    layer = nnx.merge(graphdef, state)
    _, _, metrics = layer(x)
    return metrics, layer.route(x.reshape(-1, x.shape[-1])).expert_index

  metrics, index = run(state, x)
  counts = (np.asarray(index) < E).sum(-1)
  assert len(set(counts.tolist())) > 1, counts
  np.testing.assert_allclose(metrics["experts_per_token"], counts.mean(), rtol=1e-6)


# ---------------------------------------------------------------- cosine / X-MoE (arXiv:2204.09179)

def _cosine_ref(router, x):
  proj = np.asarray(router.proj[...], np.float64)
  w = np.asarray(router.expert_embed[...], np.float64)
  h = np.asarray(x, np.float64) @ proj
  h /= np.linalg.norm(h, axis=-1, keepdims=True)
  w = w / np.linalg.norm(w, axis=0, keepdims=True)
  scale = min(math.exp(float(router.log_inv_temperature[...][0])), MAX_INV_TEMPERATURE)
  return h @ w * scale


def test_cosine_logits_are_bounded_scale_invariant_and_match_the_reference():
  d, t = 16, 32
  router = ROUTERS["cosine"](d, E, 2, rngs=nnx.Rngs(0))
  assert router.proj.shape == (d, E // 2) and router.gate is None
  x = np.random.default_rng(4).normal(size=(t, d)).astype(np.float32)
  logits = jax.jit(lambda x: router.logits(x, train=False, rng=None))
  out = np.asarray(logits(jnp.asarray(x)))
  assert np.abs(out).max() <= 1 / 0.07 * (1 + 1e-6)
  np.testing.assert_allclose(out, _cosine_ref(router, x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(logits(jnp.asarray(3.5 * x))), out, rtol=1e-5,
                             atol=1e-5)
  router.log_inv_temperature[...] = jnp.float32(math.log(1e4))      # clamped at 1/tau = 100
  big = np.asarray(router.logits(jnp.asarray(x), train=False, rng=None))
  assert np.abs(big).max() <= MAX_INV_TEMPERATURE * (1 + 1e-6)
  np.testing.assert_allclose(big, _cosine_ref(router, x), rtol=1e-5, atol=1e-4)


def test_cosine_accepts_loss_free_balancing():
  router = ROUTERS["cosine"](16, E, 1, rngs=nnx.Rngs(0), bias_update_rate=0.1)
  router.bias[...] = jnp.array([0.0, 0.0, 0.0, 10.0])     # larger than any probability
  x = jnp.asarray(np.random.default_rng(5).normal(size=(8, 16)), jnp.float32)
  routing = _route(router, x, train=False)
  np.testing.assert_array_equal(routing.expert_index[:, 0], 3)
  # The gate stays the unbiased probability of the chosen expert.
  np.testing.assert_allclose(routing.combine_weights[:, 0], routing.router_probs[:, 3],
                             rtol=1e-6)


# ---------------------------------------------------------------- the default LM

@pytest.mark.parametrize("name", ["expert_choice", "base", "top_p", "cosine"])
def test_default_config_accepts_the_router(name):
  cfg = load_config(**{"model.moe.router": name, "model.moe.top_k": 1 if name == "base" else 2})
  validate_model(cfg.model)
