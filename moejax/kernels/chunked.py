"""Grouped matmul in pure JAX that multiplies the sorted rows in place, expert by expert.

For XLA:CPU, where a loop of plain 2-D matmuls on slices runs at dense-matmul speed and a Pallas
kernel can only be interpreted. The rows come sorted by expert (MegaBlocks, "MegaBlocks:
Efficient Sparse Training with Mixture-of-Experts", Gale et al. 2022, arXiv:2211.15841), so
expert e's rows are the contiguous slice [start_e, end_e). A `fori_loop` over the experts reads
rhs[e] in place (one dynamic slice per expert, not one weight copy per row tile as in
`blocked`) and walks its rows in chunks whose sizes are static:

  size_e = q * tm + (bits of the remainder r < tm, largest first, down to tmin) + (r mod tmin),

so every matmul but the last has a static shape and covers rows of expert e only; the last,
r mod tmin rows, runs on a window of tmin rows and keeps only its own rows (a select against
the rows already there). Work beyond the real rows: at most tmin - 1 rows per expert (versus up
to tm - 1 for padded tiles), and no row gathers or padding copies at all. The loops have
dynamic trip counts but static bodies, so XLA compiles each matmul shape once.

The backward pass (custom VJP) runs the same walk: d lhs = gmm(dy, rhs^T) reading rhs in place
through the dot's dimension numbers, and d rhs[e] = sum over the chunks of lhs_c^T @ dy_c,
accumulated in float32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moejax.kernels.vma import like_primal, varying_zeros

CHUNK = 512      # tm: rows of the full chunks
CHUNK_MIN = 16   # tmin: the smallest static chunk; below it one masked window


def _bounds(group_sizes, m):
  end = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
  start = jnp.concatenate([jnp.zeros((1,), jnp.int32), end[:-1]])
  return start, end - start


def _ladder(tm: int, tmin: int) -> list[int]:
  """Static chunk sizes below tm: tm/2, tm/4, ..., tmin (tm, tmin powers of two)."""
  sizes, c = [], tm // 2
  while c >= tmin:
    sizes.append(c)
    c //= 2
  return sizes


def _walk(m: int, start, size, tm: int, tmin: int, init, full_step, part_step):
  """Calls full_step(carry, row, rows) on static-size chunks covering [start, start + size)
  and part_step(carry, window_row, mask [tmin]) on the last r mod tmin rows (if any). Chunk
  rows never exceed M: `m` must be >= tmin.

  Each optional chunk is a loop of 0 or 1 trips whose row offset is a loop variable: were it a
  constant of the loop, XLA's loop-invariant code motion would hoist the matmul out of the loop
  and run it even on 0 trips.
  """
  q = size // tm

  def big(i, carry):
    return full_step(carry, start + i * tm, tm)

  carry = jax.lax.fori_loop(0, q, big, init)
  off, rem = start + q * tm, size - q * tm
  for c in _ladder(tm, tmin):
    take = (rem >= c).astype(jnp.int32)
    carry, off = jax.lax.fori_loop(
        0, take, lambda _, co, c=c: (full_step(co[0], co[1], c), co[1] + c), (carry, off))
    rem = rem - take * c

  # The last rem < tmin rows: a window of tmin rows that fits inside [0, M).
  def last(_, co):
    carry, off = co
    win = jnp.minimum(off, m - tmin)
    rows = win + jnp.arange(tmin, dtype=jnp.int32)
    return part_step(carry, win, (rows >= off) & (rows < off + rem)), off

  return jax.lax.fori_loop(0, (rem > 0).astype(jnp.int32), last, (carry, off))[0]


def _matmul(x, w, transpose_rhs):
  dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
  return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)


def _gmm(lhs, rhs, group_sizes, tm, tmin, transpose_rhs):
  """[M, K] x [E, K, N] (or [E, N, K]) -> [M, N] in lhs.dtype."""
  m, k = lhs.shape
  e = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  start, size = _bounds(group_sizes, m)

  def expert(i, out):
    w = jax.lax.dynamic_index_in_dim(rhs, i, 0, keepdims=False)     # in place: [K, N] / [N, K]

    def full(out, row, c):
      x = jax.lax.dynamic_slice_in_dim(lhs, row, c, 0)
      y = _matmul(x, w, transpose_rhs).astype(out.dtype)
      return jax.lax.dynamic_update_slice_in_dim(out, y, row, 0)

    def part(out, win, mask):
      x = jax.lax.dynamic_slice_in_dim(lhs, win, tmin, 0)
      y = _matmul(x, w, transpose_rhs).astype(out.dtype)
      old = jax.lax.dynamic_slice_in_dim(out, win, tmin, 0)
      return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(mask[:, None], y, old), win, 0)

    return _walk(m, start[i], size[i], tm, tmin, out, full, part)

  return jax.lax.fori_loop(0, e, expert,
                           varying_zeros((m, n), lhs.dtype, lhs, rhs, group_sizes))


def _tgmm(lhs, dy, group_sizes, tm, tmin, out_dtype):
  """lhs [M, K], dy [M, N] -> [E, K, N]: per-expert lhs^T @ dy, summed in float32."""
  m, k = lhs.shape
  n = dy.shape[1]
  e = group_sizes.shape[0]
  start, size = _bounds(group_sizes, m)
  tdims = (((0,), (0,)), ((), ()))

  def expert(i, out):
    def full(acc, row, c):
      x = jax.lax.dynamic_slice_in_dim(lhs, row, c, 0)
      d = jax.lax.dynamic_slice_in_dim(dy, row, c, 0)
      return acc + jax.lax.dot_general(x, d, tdims, preferred_element_type=jnp.float32)

    def part(acc, win, mask):
      x = jax.lax.dynamic_slice_in_dim(lhs, win, tmin, 0)
      x = jnp.where(mask[:, None], x, jnp.zeros_like(x))
      d = jax.lax.dynamic_slice_in_dim(dy, win, tmin, 0)
      return acc + jax.lax.dot_general(x, d, tdims, preferred_element_type=jnp.float32)

    acc = _walk(m, start[i], size[i], tm, tmin, varying_zeros((k, n), jnp.float32, lhs, dy),
                full, part)
    return jax.lax.dynamic_update_index_in_dim(out, acc.astype(out.dtype), i, 0)

  return jax.lax.fori_loop(0, e, expert,
                           varying_zeros((e, k, n), out_dtype, lhs, dy, group_sizes))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked(lhs, rhs, group_sizes, tm, tmin):
  return _gmm(lhs, rhs, group_sizes, tm, tmin, False)


def _chunked_fwd(lhs, rhs, group_sizes, tm, tmin):
  return _gmm(lhs, rhs, group_sizes, tm, tmin, False), (lhs, rhs, group_sizes)


def _chunked_bwd(tm, tmin, res, dy):
  lhs, rhs, group_sizes = res
  dy = dy.astype(lhs.dtype)
  d_lhs = _gmm(dy, rhs, group_sizes, tm, tmin, True)
  d_rhs = _tgmm(lhs, dy, group_sizes, tm, tmin, rhs.dtype)
  return like_primal(d_lhs, lhs), like_primal(d_rhs, rhs), None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def _pow2_floor(x: int) -> int:
  return 1 << (max(1, x).bit_length() - 1)


@functools.partial(jax.jit, static_argnames=("tm", "tmin"))
def chunked_gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                tm: int | None = None, tmin: int | None = None) -> jax.Array:
  """Grouped matmul by in-place chunks of the sorted rows, one expert at a time
  (MegaBlocks' grouped GEMM, arXiv:2211.15841; see the module docstring).

  Args:
    lhs: [M, K] rows sorted by group.
    rhs: [E, K, N] one matrix per group.
    group_sizes: [E] int rows per group; sum <= M (a larger total is cut at M).
    tm: rows of the full chunks (a power of two; default CHUNK).
    tmin: smallest chunk (a power of two <= tm; default CHUNK_MIN). Both are cut to M.
  Returns:
    [M, N] in lhs.dtype, accumulated in float32; rows past sum(group_sizes) are zeros.
  """
  m = lhs.shape[0]
  tm = _pow2_floor(min(tm or CHUNK, m))
  tmin = min(_pow2_floor(tmin or CHUNK_MIN), tm)
  return _chunked(lhs, rhs, group_sizes, tm, tmin)
