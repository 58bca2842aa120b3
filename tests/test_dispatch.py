"""Tests for moejax.moe.dispatch: capacity arithmetic and GShard priority against a Python loop, the
sort/inverse permutation, and the custom VJPs of permute/unpermute against plain autodiff."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.test_util import check_grads

from moejax.moe.dispatch import (DISPATCHERS, capacity_masks, expert_capacity,
                                 inverse_permutation, permute, sort_by_expert, unpermute)


def test_registry():
  assert {"capacity", "dropless"} <= set(DISPATCHERS)


@pytest.mark.parametrize("group, experts, k, factor, want", [
    (128, 8, 2, 1.25, 40),   # default config: ceil(1.25 * 128 * 2 / 8)
    (8, 4, 2, 0.5, 2),
    (5, 3, 2, 1.0, 4),       # ceil(10 / 3)
    (6, 4, 1, 1.0, 2),       # ceil(1.5)
    (16, 8, 1, 0.01, 1),     # never below one slot
    (16, 4, 2, 4.0, 32),     # factor E: room for every copy
])
def test_expert_capacity(group, experts, k, factor, want):
  assert expert_capacity(group, experts, k, factor) == want


# ----------------------------------------------------------------------------- capacity masks


def _priority_reference(expert_index, weights, num_experts, capacity):
  """GShard priority by a Python loop: all first choices (in token order) before any second
  choice; a copy is kept when its expert has fewer than `capacity` copies so far."""
  s, k = expert_index.shape
  dispatch = np.zeros((s, num_experts, capacity))
  combine = np.zeros((s, num_experts, capacity))
  filled = [0] * num_experts
  for choice in range(k):
    for token in range(s):
      e = int(expert_index[token, choice])
      if filled[e] < capacity:
        dispatch[token, e, filled[e]] = 1.0
        combine[token, e, filled[e]] = weights[token, choice]
      filled[e] += 1
  return dispatch, combine


_masks = jax.jit(jax.vmap(capacity_masks, in_axes=(0, 0, None, None)), static_argnums=(2, 3))


def test_capacity_masks_hand_made_priority():
  # Group 0: token 1's *first* choice (expert 1) beats token 0's *second* choice (expert 1),
  # although token 0 comes first. Group 1: token 3's first choice loses to token 2's first.
  index = jnp.array([[[0, 1], [1, 0]], [[0, 1], [0, 1]]], jnp.int32)        # [G=2, S=2, K=2]
  weights = jnp.array([[[0.6, 0.4], [0.7, 0.3]], [[0.8, 0.2], [0.9, 0.1]]])
  dispatch, combine = _masks(index, weights, 2, 1)                           # capacity 1
  kept = np.asarray(dispatch).sum(axis=(2, 3))                               # [G, S]
  np.testing.assert_array_equal(kept, [[1, 1], [2, 0]])
  np.testing.assert_array_equal(dispatch[0, 0], [[1], [0]])   # token 0 only in expert 0
  np.testing.assert_array_equal(dispatch[0, 1], [[0], [1]])   # token 1 only in expert 1
  np.testing.assert_array_equal(dispatch[1, 0], [[1], [1]])   # token 2 in both
  np.testing.assert_array_equal(dispatch[1, 1], [[0], [0]])   # token 3 dropped entirely
  np.testing.assert_allclose(combine[1, 0], [[0.8], [0.2]])
  np.testing.assert_allclose(combine[0, 1], [[0.0], [0.7]])


@pytest.mark.parametrize("seed, s, e, k, capacity", [(0, 12, 4, 2, 3), (1, 9, 5, 3, 2),
                                                     (2, 16, 8, 1, 1)])
def test_capacity_masks_match_loop(seed, s, e, k, capacity):
  rng = np.random.default_rng(seed)
  g = 3
  index = np.stack([[rng.choice(e, size=k, replace=False) for _ in range(s)]
                    for _ in range(g)]).astype(np.int32)
  if seed == 0:
    index[0, :, 0] = 2       # one expert flooded by first choices
  weights = rng.uniform(size=(g, s, k)).astype(np.float32)
  dispatch, combine = _masks(jnp.asarray(index), jnp.asarray(weights), e, capacity)
  for gi in range(g):
    want_d, want_c = _priority_reference(index[gi], weights[gi], e, capacity)
    np.testing.assert_array_equal(dispatch[gi], want_d)
    np.testing.assert_allclose(combine[gi], want_c, rtol=1e-7)
  assert np.asarray(dispatch).sum(axis=(1, 3)).max() <= capacity   # per group and expert
  assert 0 < np.asarray(dispatch).sum() < g * s * k                 # something was dropped


@st.composite
def _routing_case(draw):
  """A random group: S tokens each choosing K distinct experts of E, and a capacity."""
  e = draw(st.integers(1, 6))
  k = draw(st.integers(1, e))
  s = draw(st.integers(1, 12))
  capacity = draw(st.integers(1, 2 * s))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  index = np.stack([rng.choice(e, size=k, replace=False) for _ in range(s)]).astype(np.int32)
  weights = rng.uniform(size=(s, k)).astype(np.float32)
  return index, weights, e, capacity


@settings(max_examples=15, deadline=None)   # each example has new shapes: a new compile
@given(_routing_case())
def test_capacity_masks_conserve_copies(case):
  """Conservation, whatever the priority rule: each expert keeps min(its copies, C), each slot
  holds at most one copy, a copy is kept at most once and only by its own expert, with its own
  weight; kept + dropped = S*K."""
  index, weights, e, capacity = case
  dispatch, combine = (np.asarray(a) for a in capacity_masks(
      jnp.asarray(index), jnp.asarray(weights), e, capacity))
  counts = np.bincount(index.ravel(), minlength=e)
  np.testing.assert_array_equal(dispatch.sum(axis=(0, 2)), np.minimum(counts, capacity))
  assert dispatch.sum(axis=0).max(initial=0) <= 1                  # one copy per slot
  chosen = np.zeros((index.shape[0], e))
  np.put_along_axis(chosen, index, 1.0, axis=1)
  assert np.all(dispatch.sum(axis=2) <= chosen)                    # only chosen experts, once
  w = np.zeros((index.shape[0], e))
  np.put_along_axis(w, index, weights, axis=1)
  np.testing.assert_allclose(combine.sum(axis=2), w * dispatch.sum(axis=2), rtol=1e-6)
  np.testing.assert_array_equal(dispatch, _priority_reference(index, weights, e, capacity)[0])


@settings(max_examples=40, deadline=None)
@given(_routing_case())
def test_sort_by_expert_groups_copies_contiguously(case):
  index, _, e, _ = case
  sort_index = np.asarray(sort_by_expert(jnp.asarray(index)))
  flat = index.ravel()
  assert sorted(sort_index.tolist()) == list(range(flat.size))     # a permutation
  sorted_experts = flat[sort_index]
  assert np.all(np.diff(sorted_experts) >= 0)                      # grouped by expert...
  for expert in range(e):                                          # ...stable within a group
    assert np.all(np.diff(sort_index[sorted_experts == expert]) > 0)


# ----------------------------------------------------------------------------- permutation


def test_sort_by_expert_is_stable_and_inverse_inverts():
  index = jnp.array([[1, 0], [0, 2], [1, 2]], jnp.int32)   # copies: 1 0 0 2 1 2
  sort_index = sort_by_expert(index)
  np.testing.assert_array_equal(sort_index, [1, 2, 0, 4, 3, 5])
  inverse = inverse_permutation(sort_index)
  np.testing.assert_array_equal(inverse, np.argsort(np.asarray(sort_index)))
  np.testing.assert_array_equal(np.asarray(sort_index)[np.asarray(inverse)], np.arange(6))


T, K, D, NUM_E = 7, 3, 5, 4


@pytest.fixture(scope="module")
def perm():
  rng = np.random.default_rng(0)
  index = np.stack([rng.choice(NUM_E, size=K, replace=False) for _ in range(T)]).astype(np.int32)
  sort_index = sort_by_expert(jnp.asarray(index))
  return dict(index=index, sort=sort_index, inverse=inverse_permutation(sort_index),
              x=jax.random.normal(jax.random.key(0), (T, D)),
              ys=jax.random.normal(jax.random.key(1), (T * K, D)),
              cot=jax.random.normal(jax.random.key(2), (T * K, D)))


@jax.jit
def _permute_vjps(x, ys, sort_index, inverse, cot):
  """Forward values and VJPs of the custom-VJP functions and of plain jnp indexing."""
  custom_p, vjp_p = jax.vjp(lambda x: permute(x, sort_index, inverse, K), x)
  plain_p, vjp_pp = jax.vjp(lambda x: x[sort_index // K], x)
  custom_u, vjp_u = jax.vjp(lambda ys: unpermute(ys, sort_index, inverse), ys)
  plain_u, vjp_pu = jax.vjp(lambda ys: ys[inverse], ys)
  return dict(custom_p=custom_p, plain_p=plain_p, custom_u=custom_u, plain_u=plain_u,
              dx=vjp_p(cot)[0], dx_plain=vjp_pp(cot)[0],
              dys=vjp_u(cot)[0], dys_plain=vjp_pu(cot)[0])


def test_permute_and_unpermute_match_plain_indexing(perm):
  out = _permute_vjps(perm["x"], perm["ys"], perm["sort"], perm["inverse"], perm["cot"])
  copies_token = np.repeat(np.arange(T), K)
  sort_np = np.asarray(perm["sort"])
  # Forward: sorted buffer row i holds token sort_index[i] // K; every expert's rows contiguous.
  np.testing.assert_array_equal(out["custom_p"], np.asarray(perm["x"])[copies_token[sort_np]])
  np.testing.assert_array_equal(np.diff(perm["index"].reshape(-1)[sort_np]) >= 0, True)
  np.testing.assert_array_equal(out["custom_p"], out["plain_p"])
  np.testing.assert_array_equal(out["custom_u"], out["plain_u"])
  # Backward: the gather-based VJPs equal autodiff of a plain gather (a scatter-add).
  np.testing.assert_allclose(out["dx"], out["dx_plain"], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(out["dys"], out["dys_plain"])
  # And by hand: dx[t] = sum over the K sorted rows holding token t.
  want = np.zeros((T, D))
  np.add.at(want, copies_token[sort_np], np.asarray(perm["cot"]))
  np.testing.assert_allclose(out["dx"], want, rtol=1e-6, atol=1e-6)


def test_round_trip_under_grad(perm):
  """unpermute(f(permute(x))) for a row-wise f returns copies in token order; its gradient
  under jax.grad equals that of the same computation written with x repeated K times."""
  w = jax.random.normal(jax.random.key(3), (D, D))
  cot = perm["cot"]

  def loss_custom(x):
    ys = jnp.tanh(permute(x, perm["sort"], perm["inverse"], K) @ w)
    return jnp.sum(unpermute(ys, perm["sort"], perm["inverse"]) * cot)

  def loss_plain(x):
    return jnp.sum(jnp.tanh(jnp.repeat(x, K, axis=0) @ w) * cot)

  g = jax.jit(lambda x: (jax.grad(loss_custom)(x), jax.grad(loss_plain)(x),
                         loss_custom(x), loss_plain(x)))
  gc, gp, lc, lp = g(perm["x"])
  np.testing.assert_allclose(lc, lp, rtol=1e-5)
  np.testing.assert_allclose(gc, gp, rtol=1e-5, atol=1e-6)


def test_check_grads(perm):
  x64 = np.asarray(perm["x"])
  check_grads(functools.partial(permute, sort_index=perm["sort"], inverse=perm["inverse"],
                                top_k=K), (jnp.asarray(x64),), order=1, modes=("rev",),
              atol=1e-2, rtol=1e-2)
  check_grads(functools.partial(unpermute, sort_index=perm["sort"], inverse=perm["inverse"]),
              (perm["ys"],), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)
