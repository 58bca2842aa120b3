"""Tests for moejax.kernels: every grouped-matmul backend against a float64 numpy per-expert loop
(values, and the exact gradients of sum(out * cot) for lhs and rhs), the blocked backend against
`ragged_dot_gmm`, and the blocked backend's tile plan (MegaBlocks, arXiv:2211.15841).

Shapes are tiny and fixed (M=13 rows, K=3, N=4, E=5 groups) so each backend and tile size
compiles once; group sizes are traced, so new group sizes cost no compile.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moejax.config import validate_model
from moejax.kernels import GMM_BACKENDS, blocked, ragged_dot_gmm
from moejax.kernels.blocked import blocked_gmm, num_tiles, padded_rows, tile_plan, tile_rows

from gmm_cases import GROUP_SIZE_CASES, close, random_group_sizes
from helpers import load_config

M, K, N, E = 13, 3, 4, 5


def _oracle(lhs, rhs, group_sizes, cot):
  """Float64 per-expert loop: out [M, N], d lhs [M, K], d rhs [E, K, N] of sum(out * cot).

  Group e takes the next group_sizes[e] rows (cut at M); rows past the last group give zeros.
  """
  lhs, rhs, cot = (np.asarray(a, np.float64) for a in (lhs, rhs, cot))
  m = lhs.shape[0]
  out, d_lhs, d_rhs = np.zeros((m, rhs.shape[2])), np.zeros_like(lhs), np.zeros_like(rhs)
  start = 0
  for e, size in enumerate(np.asarray(group_sizes)):
    stop = min(start + int(size), m)
    rows = slice(start, stop)
    out[rows] = lhs[rows] @ rhs[e]
    d_lhs[rows] = cot[rows] @ rhs[e].T
    d_rhs[e] = lhs[rows].T @ cot[rows]
    start = stop
  return out, d_lhs, d_rhs


def _gmm(backend, tm):
  return functools.partial(blocked_gmm, tm=tm) if tm is not None else GMM_BACKENDS[backend]


@functools.partial(jax.jit, static_argnames=("backend", "tm"))
def _value_and_grads(lhs, rhs, group_sizes, cot, *, backend, tm=None):
  """(out [M, N], d lhs [M, K], d rhs [E, K, N]) of sum(gmm(lhs, rhs, group_sizes) * cot)."""
  def loss(l, r):
    out = _gmm(backend, tm)(l, r, group_sizes)
    return jnp.sum(out * cot), out
  (_, out), (d_lhs, d_rhs) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(lhs, rhs)
  return out, d_lhs, d_rhs


def _inputs(seed, m=M, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  lhs = jnp.asarray(rng.standard_normal((m, K)), dtype)
  rhs = jnp.asarray(rng.standard_normal((E, K, N)), dtype)
  cot = jnp.asarray(rng.standard_normal((m, N)), dtype)
  return lhs, rhs, cot


# (backend, tm): every registered backend with its default tile, and blocked with tiles that
# divide nothing (4: M=13 is no multiple), give one row per tile (1), or exceed M (32).
BACKENDS = [(b, None) for b in GMM_BACKENDS] + [("blocked", 1), ("blocked", 4), ("blocked", 32)]


@pytest.mark.parametrize("backend, tm", BACKENDS, ids=[f"{b}-tm{t}" for b, t in BACKENDS])
@pytest.mark.parametrize("name, sizes", GROUP_SIZE_CASES, ids=[c[0] for c in GROUP_SIZE_CASES])
def test_backend_matches_float64_loop(name, sizes, backend, tm):
  lhs, rhs, cot = _inputs(GROUP_SIZE_CASES.index((name, sizes)))
  sizes = jnp.asarray(sizes, jnp.int32)
  out, d_lhs, d_rhs = _value_and_grads(lhs, rhs, sizes, cot, backend=backend, tm=tm)
  want_out, want_lhs, want_rhs = _oracle(lhs, rhs, sizes, cot)
  assert out.shape == (M, N) and out.dtype == jnp.float32
  close(out, want_out)
  close(d_lhs, want_lhs)
  close(d_rhs, want_rhs)
  # Rows past the groups give exact zeros and get no gradient; empty groups get no gradient.
  used = min(int(sizes.sum()), M)
  np.testing.assert_array_equal(out[used:], 0.0)
  np.testing.assert_array_equal(d_lhs[used:], 0.0)
  np.testing.assert_array_equal(d_rhs[np.asarray(sizes) == 0], 0.0)


@pytest.mark.parametrize("name, sizes", GROUP_SIZE_CASES, ids=[c[0] for c in GROUP_SIZE_CASES])
def test_blocked_equals_ragged_dot(name, sizes):
  lhs, rhs, cot = _inputs(100 + GROUP_SIZE_CASES.index((name, sizes)))
  sizes = jnp.asarray(sizes, jnp.int32)
  ref = _value_and_grads(lhs, rhs, sizes, cot, backend="ragged_dot")
  for tm in (None, 4):
    got = _value_and_grads(lhs, rhs, sizes, cot, backend="blocked", tm=tm)
    for g, r in zip(got, ref):
      close(g, r, rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(sizes=random_group_sizes(M, E), tm=st.sampled_from([1, 2, 4, 8]),
       seed=st.integers(0, 2**16))
def test_blocked_property_random_group_sizes(sizes, tm, seed):
  lhs, rhs, cot = _inputs(seed)
  sizes = jnp.asarray(sizes)
  got = _value_and_grads(lhs, rhs, sizes, cot, backend="blocked", tm=tm)
  for g, w in zip(got, _oracle(lhs, rhs, sizes, cot)):
    close(g, w)


@jax.jit
def _plans(sizes):
  return {tm: tile_plan(sizes, M, tm) for tm in (1, 2, 4, 8)}


@settings(max_examples=40, deadline=None)
@given(sizes=random_group_sizes(M, E))
def test_tile_plan_invariants(sizes):
  total = int(sizes.sum())
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  for tm, (src, dst, group) in _plans(jnp.asarray(sizes)).items():
    src, dst, group = np.asarray(src), np.asarray(dst), np.asarray(group)
    nt = num_tiles(M, E, tm)
    assert src.shape == (nt * tm,) and dst.shape == (M,) and group.shape == (nt,)
    assert nt * tm == padded_rows(M, E, tm) <= M + min(E, M) * (tm - 1)
    # Every real row appears once; padding slots hold the sentinel M.
    real = src < M
    np.testing.assert_array_equal(np.sort(src[real]), np.arange(total))
    np.testing.assert_array_equal(src[~real], M)
    # dst inverts src; rows past the groups map to the sentinel P.
    np.testing.assert_array_equal(dst[src[real]], np.flatnonzero(real))
    np.testing.assert_array_equal(dst[total:], nt * tm)
    # Each tile holds a prefix of consecutive rows of its own group, in order.
    tiles = src.reshape(nt, tm)
    assert np.all(np.diff(group) >= 0)
    for t in range(nt):
      rows = tiles[t][tiles[t] < M]
      n = rows.size
      np.testing.assert_array_equal(tiles[t][:n], rows)
      if n:
        e = group[t]
        assert starts[e] <= rows.min() and rows.max() < starts[e] + sizes[e]
        np.testing.assert_array_equal(rows, np.arange(rows[0], rows[0] + n))
    # Tiles used: ceil(size / tm) per group, never more than the static bound.
    used = int(np.sum(-(-sizes // tm)))
    assert int(np.sum(tiles.min(axis=1) < M)) == used <= nt


def test_tile_rows_heuristic():
  assert tile_rows(2048, 8) == 64           # the CPU benchmark's E=8 K=2 shape
  assert tile_rows(8192, 64) == 64          # its E=64 K=8 shape: TILE_MIN binds
  assert tile_rows(32768, 8) == 1024        # the GPU benchmark's E=8 K=2 shape
  assert tile_rows(131072, 64) == 512       # its E=64 K=8 shape
  assert tile_rows(13, 5) == 16             # never far past M
  for m in (1, 7, 100, 1000, 4096, 10_000, 65_536, 1 << 20):
    for e in (1, 2, 8, 64, 256):
      tm = tile_rows(m, e)
      assert tm & (tm - 1) == 0 or tm % 8 == 0, (m, e, tm)
      assert tm <= max(8, -(-m // 8) * 8) and tm <= blocked.TILE_MAX
      if m >= 4 * e * blocked.TILE_MIN:
        assert padded_rows(m, e, tm) - m <= m / 4, (m, e, tm)   # the documented bound


def test_blocked_under_vmap():
  lhs, rhs, cot = _inputs(7, m=2 * M)
  lhs, cot = lhs.reshape(2, M, K), cot.reshape(2, M, N)
  sizes = jnp.asarray([[4, 0, 6, 0, 3], [0, 9, 0, 1, 1]], jnp.int32)
  fn = jax.jit(jax.vmap(lambda l, g, c: _value_and_grads(l, rhs, g, c, backend="blocked", tm=4)))
  got = fn(lhs, sizes, cot)
  for i in range(2):
    want = _oracle(lhs[i], rhs, sizes[i], cot[i])
    for g, w in zip(got, want):
      close(g[i], w)


def test_blocked_under_shard_map_and_sharded_jit():
  """Per-device groups under shard_map (expert parallelism's local grouped matmul), and the
  whole-array kernel under jit with rows sharded over all devices (8 simulated CPU devices)."""
  devices = jax.devices()
  n = len(devices)
  mesh = Mesh(np.asarray(devices), ("x",))       # as moejax.sharding.make_mesh builds it
  lhs, rhs, cot = _inputs(8, m=n * M)
  rng = np.random.default_rng(8)
  sizes = np.stack([np.bincount(rng.integers(0, E, rng.integers(0, M + 1)), minlength=E)
                    for _ in range(n)]).astype(np.int32)           # [n, E], sum <= M per device

  def local(l, r, g, c):
    return _value_and_grads(l, r, g[0], c, backend="blocked", tm=4)

  # rhs is replicated, so its gradient is summed over the devices (shard_map's psum).
  fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("x"), P(), P("x"), P("x")),
                             out_specs=(P("x"), P("x"), P())))
  out, d_lhs, d_rhs = fn(lhs, rhs, jnp.asarray(sizes), cot)
  want_rhs = 0.0
  for i in range(n):
    rows = slice(i * M, (i + 1) * M)
    want_out, want_lhs, want_rhs_i = _oracle(lhs[rows], rhs, sizes[i], cot[rows])
    close(out[rows], want_out)
    close(d_lhs[rows], want_lhs)
    want_rhs = want_rhs + want_rhs_i
  close(d_rhs, want_rhs)

  flat = jnp.asarray(np.bincount(rng.integers(0, E, n * M - 5), minlength=E), jnp.int32)
  sharded = jax.device_put(lhs, NamedSharding(mesh, P("x")))
  got = jax.jit(lambda l, r, g, c: _value_and_grads(l, r, g, c, backend="blocked"))(
      sharded, rhs, flat, cot)
  for g, w in zip(got, _oracle(lhs, rhs, flat, cot)):
    close(g, w)


def test_blocked_bfloat16_accumulates_in_float32():
  lhs, rhs, cot = _inputs(9, dtype=jnp.bfloat16)
  sizes = jnp.asarray([4, 0, 6, 0, 3], jnp.int32)
  got = _value_and_grads(lhs, rhs, sizes, cot, backend="blocked", tm=4)
  ref = _value_and_grads(lhs, rhs, sizes, cot, backend="ragged_dot")
  want = _oracle(lhs, rhs, sizes, cot)
  for g, r, w in zip(got, ref, want):
    assert g.dtype == jnp.bfloat16
    err = np.linalg.norm(np.asarray(g, np.float64) - w) / np.linalg.norm(w)
    assert err < 1e-2, err
    close(g, r, rtol=1e-2, atol=1e-2)


def test_blocked_is_a_registered_valid_backend():
  assert GMM_BACKENDS["blocked"] is blocked_gmm and GMM_BACKENDS["ragged_dot"] is ragged_dot_gmm
  model = load_config().model
  model.moe.gmm_backend = "blocked"
  assert validate_model(model) is model
