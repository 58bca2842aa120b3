"""Tests for moejax.moe.routing: exact routing decisions on hand-made logits (Flaxformer style),
tie-breaking, float32 router math, Switch jitter, and the closed forms of the load-balancing
loss, the router z-loss and the routing metrics.

Every router gets an identity gate (d_model == num_experts), so its input *is* its logits and the
expected values follow from the paper formulas evaluated in float64 numpy here.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.moe.balance import load_balancing_loss, router_z_loss, routing_metrics
from moejax.moe.routing import ROUTERS, Routing, top_k_lowest_index

import reference as ref

E = 4

# Hand-made logits [8, E]; the comments give the top-2 experts (ties -> lower index).
LOGITS = np.array([
    [1.0, 2.0, 3.0, 0.0],     # 2, 1
    [0.5, 0.5, 0.5, 0.5],     # 0, 1   (all tied)
    [0.0, 2.0, 2.0, 1.0],     # 1, 2   (tie at the top)
    [3.0, 1.0, 1.0, 1.0],     # 0, 1   (tie for second place)
    [-1.0, -2.0, 0.5, 0.5],   # 2, 3
    [0.0, 0.0, 0.0, 4.0],     # 3, 0
    [-3.0, 1.0, -2.0, 0.25],  # 1, 3
    [2.0, -1.0, 2.0, -1.0],   # 0, 2
], np.float32)
TOP2 = np.array([[2, 1], [0, 1], [1, 2], [0, 1], [2, 3], [3, 0], [1, 3], [0, 2]])
TOP1 = TOP2[:, :1]

# Router name -> (registry name, top_k, router_args).
ROUTER_CASES = {
    "before": ("topk", 2, dict(softmax_order="before")),
    "before_renorm": ("topk", 2, dict(softmax_order="before", renormalize=True)),
    "after": ("topk", 2, dict(softmax_order="after")),
    "sigmoid": ("sigmoid", 2, dict()),
    "sigmoid_raw": ("sigmoid", 2, dict(renormalize=False)),
    "top1": ("topk", 1, dict()),
    "switch": ("switch", 1, dict(jitter_noise=0.1)),
}


def _identity_router(name, top_k, args, d_model=E, param_dtype=jnp.float32):
  router = ROUTERS[name](d_model, E, top_k, rngs=nnx.Rngs(0), param_dtype=param_dtype, **args)
  router.gate[...] = jnp.eye(d_model, E, dtype=param_dtype)
  return router


_ROUTERS = {key: _identity_router(*case) for key, case in ROUTER_CASES.items()}


@jax.jit
def _route_all(x):
  """x: [T, E] -> {case: Routing} at eval (one compile shared by the exact-value tests)."""
  return {key: r(x, train=False) for key, r in _ROUTERS.items()}


@pytest.fixture(scope="module")
def routed():
  return jax.tree.map(np.asarray, _route_all(jnp.asarray(LOGITS)))


def _expected(key, logits):
  """(expert_index, combine_weights, router_probs) from the float64 reference router, whose
  choices must be the hand-made ones."""
  name, k, args = ROUTER_CASES[key]
  idx, weights, probs, _ = ref.route(logits, name, k, args)
  np.testing.assert_array_equal(idx, TOP1 if k == 1 else TOP2)
  return idx, weights, probs


# ----------------------------------------------------------------------------- decisions


@pytest.mark.parametrize("key", list(ROUTER_CASES))
def test_router_exact_values(routed, key):
  r = routed[key]
  idx, weights, probs = _expected(key, LOGITS)
  k = ROUTER_CASES[key][1]
  assert r.expert_index.shape == (8, k) and r.expert_index.dtype == np.int32
  np.testing.assert_array_equal(r.expert_index, idx)
  np.testing.assert_allclose(r.combine_weights, weights, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(r.router_probs, probs, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(r.router_probs.sum(-1), 1.0, rtol=1e-6)
  for leaf in (r.combine_weights, r.router_probs):
    assert leaf.dtype == np.float32


def test_hand_computed_numbers(routed):
  # Row 0, logits [1, 2, 3, 0]: softmax over all four, then the top two.
  z = math.exp(1) + math.exp(2) + math.exp(3) + 1.0
  np.testing.assert_allclose(routed["before"].combine_weights[0],
                             [math.exp(3) / z, math.exp(2) / z], rtol=1e-6)
  # Renormalised == softmax after the top-k (Mixtral): e^3/(e^3+e^2) = 1/(1+e^-1).
  top = 1.0 / (1.0 + math.exp(-1.0))
  for key in ("before_renorm", "after"):
    np.testing.assert_allclose(routed[key].combine_weights[0], [top, 1 - top], rtol=1e-6)
  # Row 1, all logits tied: uniform probabilities, experts 0 and 1, sigmoid(0.5) each.
  np.testing.assert_allclose(routed["before"].combine_weights[1], [0.25, 0.25], rtol=1e-6)
  np.testing.assert_allclose(routed["sigmoid_raw"].combine_weights[1],
                             [1 / (1 + math.exp(-0.5))] * 2, rtol=1e-6)
  np.testing.assert_allclose(routed["sigmoid"].combine_weights[1], [0.5, 0.5], rtol=1e-6)


def test_renormalised_weights_sum_to_one(routed):
  for key in ("before_renorm", "after", "sigmoid"):
    np.testing.assert_allclose(routed[key].combine_weights.sum(-1), 1.0, rtol=1e-6)
  # Without renormalisation the top-k mass is < 1 whenever k < E.
  assert (routed["before"].combine_weights.sum(-1) < 1.0 - 1e-3).all()


def test_ties_break_towards_lower_index():
  values, index = jax.jit(top_k_lowest_index, static_argnums=1)(
      jnp.array([[1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 2.0, 2.0], [5.0, 0.0, 5.0, 0.0]]), 3)
  np.testing.assert_array_equal(index, [[0, 1, 2], [1, 2, 3], [0, 2, 1]])
  np.testing.assert_array_equal(values, [[1, 1, 1], [2, 2, 2], [5, 5, 0]])
  assert index.dtype == jnp.int32


def test_group_sizes_count_copies(routed):
  for key, r in routed.items():
    k = ROUTER_CASES[key][1]
    np.testing.assert_array_equal(r.group_sizes, np.bincount(r.expert_index.ravel(), minlength=E))
    assert r.group_sizes.sum() == 8 * k and r.group_sizes.dtype == np.int32


def test_routing_is_one_type_for_every_router(routed):
  for key, r in routed.items():
    assert isinstance(r, Routing)
    assert set(r.aux_losses) == {"lb_loss", "z_loss"}, key
    assert set(r.metrics) == {"load", "max_vio", "router_entropy"}, key


def test_routing_losses_and_metrics_match_closed_forms(routed):
  lse = np.log(np.exp(LOGITS.astype(np.float64)).sum(-1))
  for key, r in routed.items():
    idx, _, probs = _expected(key, LOGITS)
    f = np.bincount(idx.ravel(), minlength=E) / idx.size
    np.testing.assert_allclose(r.aux_losses["lb_loss"], E * np.sum(f * probs.mean(0)), rtol=1e-6)
    np.testing.assert_allclose(r.aux_losses["z_loss"], np.mean(lse ** 2), rtol=1e-6)
    np.testing.assert_allclose(r.metrics["load"], f, rtol=1e-6)
    np.testing.assert_allclose(r.metrics["max_vio"], f.max() / f.mean() - 1, rtol=1e-6)
    entropy = -(probs * np.log(probs)).sum(-1).mean()
    np.testing.assert_allclose(r.metrics["router_entropy"], entropy, rtol=1e-6)


def test_uniform_routing_has_unit_balance_loss():
  # Row t prefers expert t mod E, every row a cyclic shift of the same logits: each expert gets
  # exactly 1/E of the copies and mean probability 1/E, so E * sum f P = 1.
  logits = np.stack([np.roll([3.0, 1.0, 0.0, -1.0], t) for t in range(8)]).astype(np.float32)
  r = _route_all(jnp.asarray(logits))
  for key in ("before", "before_renorm", "after", "sigmoid", "top1", "switch"):
    np.testing.assert_allclose(r[key].metrics["load"], 0.25, rtol=1e-6)
    np.testing.assert_allclose(r[key].aux_losses["lb_loss"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(r[key].metrics["max_vio"], 0.0, atol=1e-6)


# ----------------------------------------------------------------------------- pure losses

_lb = jax.jit(load_balancing_loss)
_z = jax.jit(router_z_loss)
_metrics = jax.jit(routing_metrics)


def test_load_balancing_loss_hand_values():
  # Perfectly uniform: f = P = 1/E.
  assert float(_lb(jnp.full((2, 4), 0.25), jnp.array([[0, 1], [2, 3]]))) == pytest.approx(1.0)
  # Skewed, E=2, K=1: f = (3/4, 1/4), P = (0.7, 0.3) -> 2 * (0.525 + 0.075) = 1.2.
  probs = jnp.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6]])
  assert float(_lb(probs, jnp.array([[0], [0], [0], [1]]))) == pytest.approx(1.2, rel=1e-6)
  # Collapsed onto one expert with certainty: the maximum, E.
  collapsed = jnp.tile(jnp.array([[1.0, 0.0, 0.0, 0.0]]), (2, 1))
  assert float(_lb(collapsed, jnp.zeros((2, 1), jnp.int32))) == pytest.approx(4.0)


def test_z_loss_hand_values():
  ln2 = math.log(2.0)
  # logsumexp([0, 0]) = ln 2, logsumexp([ln 3, 0]) = ln 4 = 2 ln 2 -> mean of squares 2.5 ln2^2.
  got = float(_z(jnp.array([[0.0, 0.0], [math.log(3.0), 0.0]])))
  assert got == pytest.approx(2.5 * ln2 ** 2, rel=1e-6)


def test_metrics_hand_values():
  probs = jnp.array([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
  m = jax.tree.map(np.asarray, _metrics(probs, jnp.array([3, 1, 0, 0], jnp.int32)))
  np.testing.assert_allclose(m["load"], [0.75, 0.25, 0.0, 0.0], rtol=1e-7)
  assert float(m["max_vio"]) == pytest.approx(0.75 / 0.25 - 1.0)
  # 0 log 0 = 0: entropies ln 2 and 0.
  assert float(m["router_entropy"]) == pytest.approx(math.log(2.0) / 2, rel=1e-6)


# ----------------------------------------------------------------------------- float32, jitter


def test_router_math_is_float32_with_bfloat16_inputs():
  d = 16
  router = ROUTERS["topk"](d, E, 2, rngs=nnx.Rngs(1), param_dtype=jnp.bfloat16)
  assert router.gate[...].dtype == jnp.bfloat16
  x = jax.random.normal(jax.random.key(3), (8, d), jnp.bfloat16)
  # Logits eagerly: under jit, XLA on the CPU may fold convert(dot_bf16) into a float32 dot and
  # hide a bfloat16 router; op by op it cannot.
  logits = router.logits(x, train=False, rng=None)
  r = jax.jit(lambda x: router(x))(x)
  # The reference: the same bfloat16 numbers, multiplied in float64.
  want = np.asarray(x, np.float64) @ np.asarray(router.gate[...], np.float64)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
  assert r.router_probs.dtype == jnp.float32 and r.combine_weights.dtype == jnp.float32
  np.testing.assert_allclose(r.router_probs, ref.softmax(want), rtol=1e-5, atol=1e-6)
  lse = np.log(np.exp(want).sum(-1))
  np.testing.assert_allclose(r.aux_losses["z_loss"], np.mean(lse ** 2), rtol=1e-5)


_SWITCH = _ROUTERS["switch"]  # jitter_noise = 0.1


@jax.jit
def _switch_logits(x, key):
  return {"train": _SWITCH.logits(x, train=True, rng=key),
          "train_no_rng": _SWITCH.logits(x, train=True, rng=None),
          "eval": _SWITCH.logits(x, train=False, rng=key),
          "probs_train": _SWITCH(x, train=True, rng=key).router_probs,
          "probs_eval": _SWITCH(x, train=False, rng=key).router_probs,
          "probs_train_no_rng": _SWITCH(x, train=True, rng=None).router_probs}


def test_switch_jitter_only_in_training_and_within_bounds():
  eps = _SWITCH.jitter_noise
  x = jax.random.uniform(jax.random.key(0), (64, E), minval=0.5, maxval=2.0)
  out = jax.tree.map(np.asarray, _switch_logits(x, jax.random.key(1)))
  xn = np.asarray(x)
  # Eval, or training without a key: no noise at all.
  np.testing.assert_array_equal(out["eval"], xn)
  np.testing.assert_array_equal(out["train_no_rng"], xn)
  np.testing.assert_array_equal(out["probs_eval"], out["probs_train_no_rng"])
  np.testing.assert_allclose(out["probs_eval"], ref.softmax(xn), rtol=1e-6)
  # Training with a key: a multiplicative factor in [1 - eps, 1 + eps] that spans the range.
  factor = out["train"] / xn
  assert factor.min() >= 1 - eps - 1e-6 and factor.max() <= 1 + eps + 1e-6
  assert factor.min() < 1 - eps / 2 and factor.max() > 1 + eps / 2
  assert np.abs(out["probs_train"] - out["probs_eval"]).max() > 1e-4
  other = np.asarray(_switch_logits(x, jax.random.key(2))["train"])
  assert np.abs(other - out["train"]).max() > 1e-4


def test_switch_rejects_top_k_above_one():
  with pytest.raises(ValueError, match="top_k"):
    ROUTERS["switch"](E, E, 2, rngs=nnx.Rngs(0))
