"""Block-sparse grouped matmul in pure JAX: padded row tiles, one expert per tile.

After MegaBlocks ("MegaBlocks: Efficient Sparse Training with Mixture-of-Experts", Gale et al.
2022, arXiv:2211.15841, section 5): each expert's group of rows is padded up to a multiple of a
row-tile size `tm`, so every tile of `tm` rows belongs to exactly one expert. The grouped matmul
is then one batched matmul over tiles, [num_tiles, tm, K] x [num_tiles, K, N], whose FLOPs are
those of the real rows plus the padding, never E times them (which is what `jax.lax.ragged_dot`
costs on the CPU, where it is lowered to a dense matmul over all experts for every row).

Static shapes. With M rows and E groups, group e takes ceil(g_e / tm) tiles and only non-empty
groups take any, so
  num_tiles = sum_e ceil(g_e / tm) <= (M + min(E, M) * (tm - 1)) // tm        (a static bound)
and the batched matmul always runs on the bound: num_tiles * tm <= M + min(E, M) * (tm - 1)
rows, an overhead of at most min(E, M) * (tm - 1) / M over the M real rows (`padded_rows`).
Tiles past the last real one hold only zero rows.

Cost beyond the real FLOPs: the padding above; row gathers into tiles and back (gathers in the
backward pass too, never scatters, as in MaxText's permute); a gather of each tile's expert
matrix, [num_tiles, K, N] (about 1 + E * tm / M times the weight bytes), in the forward and
again in the backward pass; and a sorted float32 segment sum of the per-tile weight gradients
back to [E, K, N].
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moejax.kernels.vma import like_primal

# Row-tile bounds. Measured on 2 CPU cores (benchmarks/RESULTS.md): below 64 rows the per-tile
# cost of XLA:CPU's batched matmul and weight gather dominates; above M / (4E) the padding does.
TILE_MIN = 64
TILE_MAX = 1024


def tile_rows(num_rows: int, num_groups: int) -> int:
  """Default row tile for M = num_rows rows in E = num_groups groups (both static).

  tm = M / (4E) rounded down to a power of two, clipped to [TILE_MIN, TILE_MAX] and to M rounded
  up to a multiple of 8. When the clip to TILE_MIN does not bind (M >= 4 * E * TILE_MIN) the
  padding overhead min(E, M) * (tm - 1) / M is below 1/4; otherwise it is below 63 * E / M.
  """
  target = max(1, num_rows // (4 * num_groups))
  tm = min(max(1 << (target.bit_length() - 1), TILE_MIN), TILE_MAX)
  return min(tm, -(-num_rows // 8) * 8)


def num_tiles(num_rows: int, num_groups: int, tm: int) -> int:
  """Static bound on sum_e ceil(g_e / tm) for any group sizes with sum(g) <= num_rows."""
  return max(1, (num_rows + min(num_groups, num_rows) * (tm - 1)) // tm)


def padded_rows(num_rows: int, num_groups: int, tm: int) -> int:
  """Rows the batched matmul computes: num_tiles * tm <= M + min(E, M) * (tm - 1)."""
  return num_tiles(num_rows, num_groups, tm) * tm


def tile_plan(group_sizes: jax.Array, num_rows: int, tm: int):
  """Where every row goes in the padded tile layout, from the group sizes alone (int32 math).

  Args:
    group_sizes: [E] int rows per group, rows sorted by group. A total above num_rows is cut at
      num_rows (the last groups lose their tail rows), as ragged_dot sees it.
    num_rows: M, static.
    tm: row tile, static.
  Returns:
    src [P] int32: padded position p holds row src[p], or M (a padding slot: zeros).
    dst [M] int32: row m sits at padded position dst[m], or P (a row past sum(group_sizes)).
    tile_group [NT] int32: the group of each tile (E - 1 for the unused tiles past the last).
    Here NT = num_tiles(M, E, tm) and P = NT * tm.
  """
  e = group_sizes.shape[0]
  nt = num_tiles(num_rows, e, tm)
  p = nt * tm
  row_end = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), num_rows)   # [E]
  row_start = jnp.concatenate([jnp.zeros((1,), jnp.int32), row_end[:-1]])       # [E]
  size = row_end - row_start                                                    # [E]
  tiles = (size + tm - 1) // tm                                                 # [E]
  tile_end = jnp.cumsum(tiles)                                                  # [E]
  tile_start = tile_end - tiles
  t = jnp.arange(nt, dtype=jnp.int32)
  # The group of tile t is the number of groups whose tiles all end at or before t (E is small:
  # compare with every group end rather than search). Tiles past the last used one get E,
  # clipped to E - 1; their `local` rows start at or past that group's end: all padding.
  group = jnp.sum(tile_end[None, :] <= t[:, None], axis=1, dtype=jnp.int32)    # [NT]
  group = jnp.minimum(group, e - 1)
  local = (t - tile_start[group])[:, None] * tm + jnp.arange(tm, dtype=jnp.int32)  # [NT, tm]
  real = local < size[group][:, None]
  src = jnp.where(real, row_start[group][:, None] + local, num_rows).reshape(p)
  dst = jnp.full((num_rows,), p, jnp.int32).at[src].set(
      jnp.arange(p, dtype=jnp.int32), mode="drop", unique_indices=True)
  return src, dst, group


def _take_rows(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [R, C], index [S] -> [S, C]; an index >= R (the sentinel) gives a row of zeros."""
  return jnp.take(x, index, axis=0, mode="fill", fill_value=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked(lhs, rhs, group_sizes, tm):
  return _blocked_fwd(lhs, rhs, group_sizes, tm)[0]


def _blocked_fwd(lhs, rhs, group_sizes, tm):
  m, k = lhs.shape
  n = rhs.shape[2]
  src, dst, group = tile_plan(group_sizes, m, tm)
  nt = group.shape[0]
  x = _take_rows(lhs, src).reshape(nt, tm, k)                                 # [NT, tm, K]
  w = jnp.take(rhs, group, axis=0, indices_are_sorted=True)                   # [NT, K, N]
  y = jnp.einsum("tmk,tkn->tmn", x, w, preferred_element_type=jnp.float32)   # [NT, tm, N]
  out = _take_rows(y.astype(lhs.dtype).reshape(nt * tm, n), dst)              # [M, N]
  return out, (lhs, rhs, src, dst, group)


def _blocked_bwd(tm, res, g):
  lhs, rhs, src, dst, group = res
  k, n, nt = lhs.shape[1], rhs.shape[2], group.shape[0]
  g = g.astype(lhs.dtype)              # bfloat16 operands: bfloat16 matmuls, as a dense layer's
  dy = _take_rows(g, src).reshape(nt, tm, n)                                  # [NT, tm, N]
  x = _take_rows(lhs, src).reshape(nt, tm, k)                                 # [NT, tm, K]
  w = jnp.take(rhs, group, axis=0, indices_are_sorted=True)                   # [NT, K, N]
  dx = jnp.einsum("tmn,tkn->tmk", dy, w, preferred_element_type=jnp.float32)
  d_lhs = _take_rows(dx.astype(lhs.dtype).reshape(nt * tm, k), dst)           # [M, K]
  dw = jnp.einsum("tmk,tmn->tkn", x, dy, preferred_element_type=jnp.float32)  # [NT, K, N]
  d_rhs = jax.ops.segment_sum(dw, group, rhs.shape[0], indices_are_sorted=True)
  return like_primal(d_lhs, lhs), like_primal(d_rhs.astype(rhs.dtype), rhs), None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


@functools.partial(jax.jit, static_argnames=("tm",))
def blocked_gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                tm: int | None = None) -> jax.Array:
  """Grouped matmul over padded row tiles (MegaBlocks' block-sparse form, arXiv:2211.15841).

  Same contract as `ragged_dot_gmm`: rows past sum(group_sizes) give zeros. Differentiable in
  lhs and rhs by a custom VJP whose backward pass is gathers, two batched matmuls and a sorted
  segment sum:
    d tiles = gather(d out, src); d lhs = gather(d tiles @ W_tile^T, dst);
    d rhs[e] = sum over the tiles t of group e of x_t^T @ d tiles_t  (summed in float32).
  It rounds the incoming cotangent to lhs.dtype, so with bfloat16 operands the backward matmuls
  run in bfloat16 as a dense layer's do (differentiating through the float32 accumulator would
  make them float32 x bfloat16 matmuls, several times slower on a GPU), and it keeps lhs and
  rhs, not the tiles or the gathered [NT, K, N] weights, gathering them again.

  Args:
    lhs: [M, K] rows sorted by group.
    rhs: [E, K, N] one matrix per group.
    group_sizes: [E] int rows per group; sum <= M.
    tm: row tile (static), at most M rounded up to a multiple of 8; default `tile_rows(M, E)`.
  Returns:
    [M, N] in lhs.dtype, accumulated in float32.
  """
  m = lhs.shape[0]
  tm = tile_rows(m, rhs.shape[0]) if tm is None else min(tm, -(-m // 8) * 8)   # no tile past M
  return _blocked(lhs, rhs, group_sizes, tm)
