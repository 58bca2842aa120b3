"""Tests for the Pallas grouped matmul (moejax.kernels.gmm) and the pure-JAX `chunked` backend,
both kernels (`visits`, the TPU one, and `tiles`, the GPU one) run in the Pallas interpreter on
the CPU, against a float64 numpy per-group loop and against `jax.lax.ragged_dot`
(MegaBlocks' grouped GEMM, arXiv:2211.15841).

Shapes are tiny (M=13 rows, K=3, N=5, G=5 groups) and the group sizes are traced, so each
kernel and tiling compiles once. Tilings: (4, 2, 2) splits M, K and N into several blocks that
none of them divides, so tiles straddle group boundaries and every padding path runs; None is
the default (one block per dimension at these sizes).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moejax.kernels import GMM_BACKENDS, chunked_gmm, pallas_gmm
from moejax.kernels.gmm import _visit_plan, default_tiling, gmm, tgmm
from moejax.moe import MoELayer

from gmm_cases import GROUP_SIZE_CASES, close, random_group_sizes

M, K, N, G = 13, 3, 5, 5


def _oracle(lhs, rhs, group_sizes, cot):
  """Float64 loop: out [M, N], d lhs [M, K], d rhs [G, K, N] of sum(out * cot)."""
  lhs, rhs, cot = (np.asarray(a, np.float64) for a in (lhs, rhs, cot))
  m = lhs.shape[0]
  out, d_lhs, d_rhs = np.zeros((m, rhs.shape[2])), np.zeros_like(lhs), np.zeros_like(rhs)
  start = 0
  for g, size in enumerate(np.asarray(group_sizes)):
    rows = slice(start, min(start + int(size), m))
    out[rows] = lhs[rows] @ rhs[g]
    d_lhs[rows] = cot[rows] @ rhs[g].T
    d_rhs[g] = lhs[rows].T @ cot[rows]
    start = rows.stop
  return out, d_lhs, d_rhs


def _fn(kernel, tiling):
  if kernel == "chunked":
    tm, tmin = tiling or (None, None)
    return functools.partial(chunked_gmm, tm=tm, tmin=tmin)
  return functools.partial(gmm, kernel=kernel, tiling=tiling, interpret=True)


@functools.partial(jax.jit, static_argnames=("kernel", "tiling"))
def _value_and_grads(lhs, rhs, group_sizes, cot, *, kernel, tiling=None):
  """(out, d lhs, d rhs) of sum(gmm(lhs, rhs, group_sizes) * cot)."""
  def loss(l, r):
    out = _fn(kernel, tiling)(l, r, group_sizes)
    return jnp.sum(out.astype(jnp.float32) * cot), out
  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(lhs, rhs)
  return (out, *grads)


@functools.partial(jax.jit, static_argnames=("kernel", "tiling"))
def _ragged_dot_value_and_grads(lhs, rhs, group_sizes, cot, *, kernel=None, tiling=None):
  del kernel, tiling
  def loss(l, r):
    out = jax.lax.ragged_dot(l, r, group_sizes, preferred_element_type=jnp.float32)
    return jnp.sum(out * cot), out.astype(l.dtype)
  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(lhs, rhs)
  return (out, *grads)


def _inputs(seed, m=M, g=G, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((m, K)), dtype),
          jnp.asarray(rng.standard_normal((g, K, N)), dtype),
          jnp.asarray(rng.standard_normal((m, N)), jnp.float32))


# (kernel, tiling): both Pallas kernels at the default and at blocks dividing nothing; chunked
# at its default and at (tm, tmin) = (4, 2), which runs every chunk path at M=13.
KERNELS = [("visits", None), ("visits", (4, 2, 2)), ("tiles", None), ("tiles", (4, 2, 2)),
           ("chunked", None), ("chunked", (4, 2))]
KERNEL_IDS = [f"{k}-{'x'.join(map(str, t)) if t else 'default'}" for k, t in KERNELS]


@pytest.mark.parametrize("kernel, tiling", KERNELS, ids=KERNEL_IDS)
@pytest.mark.parametrize("name, sizes", GROUP_SIZE_CASES, ids=[c[0] for c in GROUP_SIZE_CASES])
def test_gmm_vjp_matches_float64_and_ragged_dot(name, sizes, kernel, tiling):
  lhs, rhs, cot = _inputs(GROUP_SIZE_CASES.index((name, sizes)))
  sizes = jnp.asarray(sizes, jnp.int32)
  got = _value_and_grads(lhs, rhs, sizes, cot, kernel=kernel, tiling=tiling)
  ref = _ragged_dot_value_and_grads(lhs, rhs, sizes, cot)
  want = _oracle(lhs, rhs, sizes, cot)
  assert [a.shape for a in got] == [(M, N), (M, K), (G, K, N)]
  for g, r, w in zip(got, ref, want):
    close(g, w)
    close(g, r)
  used = min(int(sizes.sum()), M)
  np.testing.assert_array_equal(got[0][used:], 0.0)        # rows past the groups: zeros
  np.testing.assert_array_equal(got[1][used:], 0.0)
  np.testing.assert_array_equal(got[2][np.asarray(sizes) == 0], 0.0)


@settings(max_examples=8, deadline=None)
@given(sizes=random_group_sizes(M, G), kernel=st.sampled_from(["visits", "tiles", "chunked"]),
       seed=st.integers(0, 2**16))
def test_gmm_property_random_group_sizes(sizes, kernel, seed):
  lhs, rhs, cot = _inputs(seed)
  tiling = (4, 2) if kernel == "chunked" else (4, 2, 2)
  got = _value_and_grads(lhs, rhs, jnp.asarray(sizes), cot, kernel=kernel, tiling=tiling)
  for g, w in zip(got, _oracle(lhs, rhs, sizes, cot)):
    close(g, w)


@pytest.mark.parametrize("kernel", ["visits", "tiles"])
def test_tgmm_matches_float64(kernel):
  lhs, _, dy = _inputs(11)
  sizes = jnp.asarray([3, 0, 7, 1, 0], jnp.int32)        # sum 11 < M: the last rows are unused
  got = tgmm(lhs, dy, sizes, kernel=kernel, tiling=(4, 2, 2), interpret=True,
             out_dtype=jnp.float32)
  _, _, want = _oracle(lhs, np.zeros((G, K, N)), sizes, dy)
  close(got, want)


@pytest.mark.parametrize("kernel", ["visits", "tiles", "chunked"])
def test_gmm_256_groups(kernel):
  """G = 256 groups for 40 rows: most empty, a few large, one straddling every tile."""
  m, g = 40, 256
  lhs, rhs, cot = _inputs(12, m=m, g=g)
  sizes = np.zeros(g, np.int32)
  sizes[[0, 3, 100, 101, 200, 255]] = [5, 9, 1, 11, 7, 4]   # sum 37 < M
  tiling = (8, 2) if kernel == "chunked" else (8, 2, 2)
  got = _value_and_grads(lhs, rhs, jnp.asarray(sizes), cot, kernel=kernel, tiling=tiling)
  for a, w in zip(got, _oracle(lhs, rhs, sizes, cot)):
    close(a, w)


@pytest.mark.parametrize("kernel", ["visits", "tiles", "chunked"])
def test_bfloat16_accumulates_in_float32(kernel):
  lhs, rhs, cot = _inputs(9, dtype=jnp.bfloat16)
  sizes = jnp.asarray([4, 0, 6, 0, 3], jnp.int32)
  tiling = (4, 2) if kernel == "chunked" else (4, 2, 2)
  got = _value_and_grads(lhs, rhs, sizes, cot, kernel=kernel, tiling=tiling)
  want = _oracle(lhs, rhs, sizes, cot)
  for a, w in zip(got, want):
    assert a.dtype == jnp.bfloat16
    err = np.linalg.norm(np.asarray(a, np.float64) - w) / np.linalg.norm(w)
    assert err < 1e-2, err


def test_visit_plan_counts_and_order():
  """Visits: every (group, tile) pair a group touches, in order, then inactive repeats."""
  start = jnp.asarray([0, 3, 3, 10], jnp.int32)
  end = jnp.asarray([3, 3, 10, 13], jnp.int32)       # group 1 empty; tm=4, 4 tiles
  group, tile, active = (np.asarray(a) for a in _visit_plan(start, end, 4, 4, 4 + 4))
  np.testing.assert_array_equal(group, [0, 1, 2, 2, 2, 3, 3, 3])
  np.testing.assert_array_equal(tile, [0, 0, 0, 1, 2, 2, 3, 3])
  np.testing.assert_array_equal(active, [1, 1, 1, 1, 1, 1, 1, 0])


def test_default_tiling_and_registry():
  assert default_tiling(8192, 512, 1024, "visits") == (128, 512, 512)
  assert default_tiling(13, 3, 5, "visits") == (16, 3, 5)
  tm, tk, tn = default_tiling(13, 3, 5, "tiles")
  assert all(t & (t - 1) == 0 and t >= 16 for t in (tm, tk, tn))   # Triton: powers of two
  assert GMM_BACKENDS["pallas"] is pallas_gmm and GMM_BACKENDS["chunked"] is chunked_gmm
  with pytest.raises(ValueError, match="kernel="):
    gmm(jnp.zeros((4, 2)), jnp.zeros((1, 2, 2)), jnp.asarray([4]), kernel="cuda_magic")


@pytest.mark.parametrize("backend,fused", [("pallas", False), ("chunked", False),
                                           ("chunked", True)])
def test_moe_layer_backend_equals_ragged_dot(backend, fused):
  """A dropless MoE layer (8 experts, top-2, 2 x 12 tokens) gives the same output and the same
  gradients for every parameter and the input with `backend` as with `ragged_dot`; `fused`:
  with `model.moe.fused_gather` (rows read through the sort index, unpermute fused with the
  combine)."""
  from flax import nnx                         # noqa: PLC0415
  from helpers import load_config              # noqa: PLC0415

  model = load_config().model
  model.d_model, model.d_ff = 8, 16
  model.moe.num_experts, model.moe.top_k, model.moe.dispatch = 8, 2, "dropless"
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 12, 8)), jnp.float32)
  results = []
  for name, fused_gather in (("ragged_dot", False), (backend, fused)):
    model.moe.gmm_backend, model.moe.fused_gather = name, fused_gather
    graphdef, state = nnx.split(MoELayer(model, rngs=nnx.Rngs(0)))

    def loss(state, x, graphdef=graphdef):
      y, aux, _ = nnx.merge(graphdef, state)(x)
      return jnp.sum(y * y) + aux, y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state, x)
    results.append((y, jax.tree.leaves(grads)))
  (y_ref, g_ref), (y, g) = results
  close(y, y_ref)
  assert len(g) == len(g_ref)
  for a, b in zip(g, g_ref):
    close(a, b, rtol=1e-4, atol=1e-5)
