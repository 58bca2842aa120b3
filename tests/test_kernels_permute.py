"""Tests for moejax.kernels.permute: permute, unpermute_combine and the fused-gather grouped
matmul (ScatterMoE, arXiv:2403.08245) against plain JAX indexing and its autodiff, with the
row gather as an XLA gather and as the Pallas kernel in the interpreter.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.kernels import chunked_gmm
from moejax.kernels.permute import gather_gmm, gather_rows, permute, unpermute_combine

T, K, D, E, N = 7, 3, 5, 4, 6      # M = T*K = 21 copies


def _routing(seed):
  """expert_index [T, K] (distinct experts per token), sort_index, inverse, group_sizes."""
  rng = np.random.default_rng(seed)
  expert_index = np.stack([rng.permutation(E)[:K] for _ in range(T)])
  sort_index = np.argsort(expert_index.reshape(-1), kind="stable").astype(np.int32)
  inverse = np.argsort(sort_index).astype(np.int32)
  group_sizes = np.bincount(expert_index.reshape(-1), minlength=E).astype(np.int32)
  return tuple(jnp.asarray(a) for a in (sort_index, inverse, group_sizes))


def _data(seed):
  rng = np.random.default_rng(100 + seed)
  x = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
  w = jnp.asarray(rng.random((T, K)), jnp.float32)
  rhs = jnp.asarray(rng.standard_normal((E, D, N)), jnp.float32)
  return x, w, rhs


def _close(got, want):
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["xla", "pallas"])
def test_gather_rows_is_indexing(kernel):
  x = jnp.arange(40 * 3, dtype=jnp.float32).reshape(40, 3)
  index = jnp.asarray(np.random.default_rng(0).integers(0, 40, 37), jnp.int32)
  np.testing.assert_array_equal(gather_rows(x, index, kernel=kernel, interpret=True), x[index])


@functools.partial(jax.jit, static_argnames=("kernel",))
def _permute_pipeline(x, w, rhs, sort_index, inverse, group_sizes, kernel):
  """(y, grads) of a permute -> per-expert matmul -> unpermute_combine pipeline, and of the
  same pipeline in plain indexing, for sum(y * y)."""
  def ours(x, w, rhs):
    xs = permute(x, sort_index, inverse, K, kernel=kernel, interpret=True)
    ys = chunked_gmm(xs, rhs[:, :, :D], group_sizes, tm=4, tmin=2)
    y = unpermute_combine(ys, sort_index, inverse, w, kernel=kernel, interpret=True)
    return jnp.sum(y * y), y

  def plain(x, w, rhs):
    xs = x[sort_index // K]
    ys = jax.lax.ragged_dot(xs, rhs[:, :, :D], group_sizes)
    y = jnp.einsum("tk,tkd->td", w, ys[inverse].reshape(T, K, D))
    return jnp.sum(y * y), y

  grad = lambda f: jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(x, w, rhs)
  return grad(ours), grad(plain)


@pytest.mark.parametrize("kernel", ["xla", "pallas"])
@pytest.mark.parametrize("seed", [0, 1])
def test_permute_and_unpermute_combine_match_indexing(seed, kernel):
  x, w, rhs = _data(seed)
  (_, y), grads = _permute_pipeline(x, w, rhs, *_routing(seed), kernel=kernel)[0]
  (_, y_ref), grads_ref = _permute_pipeline(x, w, rhs, *_routing(seed), kernel=kernel)[1]
  _close(y, y_ref)
  for g, r in zip(grads, grads_ref):
    _close(g, r)


def test_permute_alone_matches_indexing():
  x, _, _ = _data(2)
  sort_index, inverse, _ = _routing(2)
  cot = jnp.asarray(np.random.default_rng(3).standard_normal((T * K, D)), jnp.float32)
  f = lambda x: jnp.sum(permute(x, sort_index, inverse, K) * cot)
  g = lambda x: jnp.sum(x[sort_index // K] * cot)
  np.testing.assert_array_equal(permute(x, sort_index, inverse, K), x[sort_index // K])
  _close(jax.grad(f)(x), jax.grad(g)(x))


@pytest.mark.parametrize("drop_last", [0, 5])
def test_gather_gmm_matches_permute_then_gmm(drop_last):
  """Fused gather == gmm on the permuted copy, values and gradients; with drop_last > 0 the
  group sizes sum to less than M (the last rows are zeros)."""
  x, _, rhs = _data(4)
  sort_index, inverse, sizes = _routing(4)
  sizes = sizes.at[-1].add(-min(drop_last, int(sizes[-1])))
  cot = jnp.asarray(np.random.default_rng(5).standard_normal((T * K, N)), jnp.float32)

  @jax.jit
  def both(x, rhs):
    fused = lambda x, r: jnp.sum(gather_gmm(x, r, sizes, sort_index, inverse, K, tm=4,
                                            tmin=2) * cot)
    plain = lambda x, r: jnp.sum(jax.lax.ragged_dot(x[sort_index // K], r, sizes) * cot)
    return (jax.value_and_grad(fused, argnums=(0, 1))(x, rhs),
            jax.value_and_grad(plain, argnums=(0, 1))(x, rhs))

  (v, g), (v_ref, g_ref) = both(x, rhs)
  _close(v, v_ref)
  for a, b in zip(g, g_ref):
    _close(a, b)
