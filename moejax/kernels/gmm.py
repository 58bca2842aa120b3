"""Grouped matmul (`gmm`) and its weight-gradient transpose (`tgmm`) as Pallas kernels.

The MegaBlocks formulation ("MegaBlocks: Efficient Sparse Training with Mixture-of-Experts",
Gale et al. 2022, arXiv:2211.15841): rows of `lhs` come sorted by group, group g owns the rows
[start_g, end_g) with end_g = min(cumsum(group_sizes)_g, M), and

  gmm(lhs [M, K], rhs [G, K, N], group_sizes [G]) [m] = lhs[m] @ rhs[g(m)]     -> [M, N]
  tgmm(lhs [M, K], dy [M, N], group_sizes [G]) [g]  = lhs[rows of g]^T @ dy[rows of g] -> [G, K, N]

Rows past sum(group_sizes) give zeros (and no gradient); empty groups give zero weight
gradients. `gmm` is differentiable through a `jax.custom_vjp` whose backward pass is one `gmm`
against the transposed weights (read in place, never copied) and one `tgmm`, both accumulating
in float32 whatever the operand dtype.

Two kernel bodies, one per Pallas lowering, share the group bookkeeping (`_group_bounds`):

- `visits` (TPU, Mosaic). The grid walks (group, row tile) *visits* in order: the row tiles of
  the M sorted rows are fixed (tm rows each, aligned), and a tile that straddles a group
  boundary is visited once per group it touches, masking the other groups' rows. Groups are
  contiguous, so the visits of a tile are consecutive and its output block stays in VMEM across
  them; the per-visit group and tile indices are scalar-prefetched so that the BlockSpec index
  maps can pick each visit's weight block. Number of visits (static bound):
    sum_g (tiles spanned by group g) <= NT + (non-empty groups) - 1 <= NT + G,
  with NT = ceil(M / tm), never G * NT. (This is the plan of megablox, jax's
  `pallas/ops/tpu/megablox`, re-derived here; the code is ours.)
- `tiles` (GPU, Triton; and the CPU in interpret mode). One program per output tile with no
  cross-program state (Triton's grid is parallel): a `gmm` program loops over the groups that
  touch its row tile, a `tgmm` program over the row tiles of its group, loading blocks through
  dynamic slices of whole-array refs.

Both run with `interpret=True` on any platform, and the tests run both that way on the CPU.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from moejax.kernels.vma import like_primal, out_struct, vary_alike

KERNELS = ("visits", "tiles")


class Tiling(NamedTuple):
  """Block sizes: tm rows of lhs, tk of the contracted width K, tn of the output width N."""
  tm: int
  tk: int
  tn: int


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _pow2_at_least(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def default_tiling(m: int, k: int, n: int, kernel: str) -> Tiling:
  """Block sizes for an [M, K] x [G, K, N] gmm on `kernel`.

  `visits` (TPU): 128-row tiles (padding a group boundary costs at most one tile of wasted rows
  per group) and 512-wide K and N blocks, or the whole dimension when smaller (a Mosaic block is
  a multiple of (8, 128) or the full dimension). `tiles` (Triton needs powers of two): 64 rows,
  K and N blocks of up to 64 and 128.
  """
  if kernel == "visits":
    tm = min(128, _round_up(m, 8))
    tk = k if k <= 512 else 512
    tn = n if n <= 512 else 512
    return Tiling(tm, tk, tn)
  return Tiling(min(64, _pow2_at_least(max(m, 16))), min(64, _pow2_at_least(max(k, 16))),
                min(128, _pow2_at_least(max(n, 16))))


def _default_kernel() -> str:
  return "visits" if jax.default_backend() == "tpu" else "tiles"


def _group_bounds(group_sizes: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
  """(start [G], end [G]) int32 row ranges of the groups, cut at M rows."""
  end = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
  start = jnp.concatenate([jnp.zeros((1,), jnp.int32), end[:-1]])
  return start, end


def _visit_plan(start: jax.Array, end: jax.Array, tm: int, num_tiles: int, num_visits: int):
  """Per-visit (group [V], tile [V], active [V]) int32 for the `visits` kernels.

  Args:
    start, end: [P] row ranges of the P groups to plan for.
  A group spans the tiles floor(start / tm) .. ceil(end / tm) - 1, and takes at least one visit
  even when empty (its range is empty then, so the visit adds nothing, but tgmm's visit writes
  the zeros of its weight gradient). Visits are ordered by group, then tile, so the tile index
  never decreases and a group's visits are consecutive. The visits past the last real one
  repeat it with active = 0: kernels must skip them.
  """
  p = start.shape[0]
  first = jnp.minimum(start // tm, num_tiles - 1)
  span = jnp.maximum((end + tm - 1) // tm - first, 1)                          # [P]
  offset = jnp.cumsum(span)                                                     # [P]
  v = jnp.arange(num_visits, dtype=jnp.int32)
  group = jnp.sum(offset[None, :] <= v[:, None], axis=1, dtype=jnp.int32)      # [V], P if past
  active = group < p
  group = jnp.minimum(group, p - 1)
  tile = jnp.where(active, first[group] + v - (offset[group] - span[group]), num_tiles - 1)
  return group, jnp.minimum(tile, num_tiles - 1).astype(jnp.int32), active.astype(jnp.int32)


def _pad_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  pads = [(0, s - d) for s, d in zip(shape, x.shape)]
  return jnp.pad(x, pads) if any(p for _, p in pads) else x


def _interpret_arg(interpret, kernel):
  """pallas_call's `interpret`: False to compile, else the generic (HLO) interpreter."""
  del kernel
  return bool(interpret)


# ----------------------------------------------------------------------------------------------
# `visits` kernels (TPU Mosaic).

def _gmm_visits(lhs, rhs, start, end, tiling: Tiling, transpose_rhs: bool, out_dtype,
                interpret):
  """lhs [Mp, Kp], rhs [G, Kp, Np] (or [G, Np, Kp] when transpose_rhs) -> [Mp, Np]."""
  from jax.experimental.pallas import tpu as pltpu    # only this lowering needs it

  tm, tk, tn = tiling
  mp, kp = lhs.shape
  g = rhs.shape[0]
  np_ = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  nt, nk, nn = mp // tm, kp // tk, np_ // tn
  # One more group, G, owns the rows past sum(group_sizes): its visits write their zeros, so
  # every output tile is visited. Its mask is empty and it reads rhs[G - 1].
  plan_start = jnp.concatenate([start, end[-1:]])
  plan_end = jnp.concatenate([end, jnp.full((1,), mp, jnp.int32)])
  mstart = jnp.concatenate([start, jnp.zeros((1,), jnp.int32)])
  mend = jnp.concatenate([end, jnp.zeros((1,), jnp.int32)])
  num_visits = nt + g + 1
  group, tile, active = _visit_plan(plan_start, plan_end, tm, nt, num_visits)

  def kernel(group_ref, tile_ref, active_ref, mstart_ref, mend_ref, lhs_ref, rhs_ref, out_ref,
             acc_ref):
    v, kk = pl.program_id(1), pl.program_id(2)

    @pl.when(kk == 0)
    def _():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
    acc_ref[...] += jax.lax.dot_general(lhs_ref[...], rhs_ref[...], dims,
                                        preferred_element_type=jnp.float32)

    @pl.when(kk == nk - 1)
    def _():
      gv, t = group_ref[v], tile_ref[v]
      rows = t * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
      mask = (rows >= mstart_ref[gv]) & (rows < mend_ref[gv]) & (active_ref[v] == 1)
      part = jnp.where(mask, acc_ref[...], 0.0)
      first = (v == 0) | (tile_ref[jnp.maximum(v - 1, 0)] != t)

      @pl.when(first)
      def _():
        out_ref[...] = part.astype(out_ref.dtype)

      @pl.when(jnp.logical_not(first))
      def _():        # other groups' rows of this tile: disjoint, so the sum is exact
        out_ref[...] += part.astype(out_ref.dtype)

  def lhs_map(n, v, kk, group_ref, tile_ref, *_):
    return tile_ref[v], kk

  def rhs_map(n, v, kk, group_ref, *_):
    gv = jnp.minimum(group_ref[v], g - 1)
    return (gv, n, kk) if transpose_rhs else (gv, kk, n)

  def out_map(n, v, kk, group_ref, tile_ref, *_):
    return tile_ref[v], n

  rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
  return pl.pallas_call(
      kernel,
      out_shape=out_struct((mp, np_), out_dtype, lhs, rhs, start, end),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=(nn, num_visits, nk),
          in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
          out_specs=pl.BlockSpec((tm, tn), out_map),
          scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
      ),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=_interpret_arg(interpret, "visits"),
      name="moejax_gmm_visits",
  )(group, tile, active, mstart, mend, lhs, rhs)


def _tgmm_visits(lhs, dy, start, end, tiling: Tiling, out_dtype, interpret):
  """lhs [Mp, Kp], dy [Mp, Np] -> [G, Kp, Np]."""
  from jax.experimental.pallas import tpu as pltpu

  tm, tk, tn = tiling
  mp, kp = lhs.shape
  np_ = dy.shape[1]
  g = start.shape[0]
  nt, nk, nn = mp // tm, kp // tk, np_ // tn
  num_visits = nt + g
  group, tile, active = _visit_plan(start, end, tm, nt, num_visits)

  def kernel(group_ref, tile_ref, active_ref, start_ref, end_ref, lhs_ref, dy_ref, out_ref,
             acc_ref):
    v = pl.program_id(2)
    gv, t = group_ref[v], tile_ref[v]
    prev_g = group_ref[jnp.maximum(v - 1, 0)]
    next_g = group_ref[jnp.minimum(v + 1, num_visits - 1)]

    @pl.when((v == 0) | (prev_g != gv))
    def _():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(active_ref[v] == 1)
    def _():
      rows = t * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, tk), 0)
      mask = (rows >= start_ref[gv]) & (rows < end_ref[gv])
      x = jnp.where(mask, lhs_ref[...], 0).astype(lhs_ref.dtype)
      acc_ref[...] += jax.lax.dot_general(x, dy_ref[...], (((0,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32)

    @pl.when((v == num_visits - 1) | (next_g != gv))
    def _():
      out_ref[...] = acc_ref[...].astype(out_ref.dtype)

  def lhs_map(kk, n, v, group_ref, tile_ref, *_):
    return tile_ref[v], kk

  def dy_map(kk, n, v, group_ref, tile_ref, *_):
    return tile_ref[v], n

  def out_map(kk, n, v, group_ref, *_):
    return group_ref[v], kk, n

  return pl.pallas_call(
      kernel,
      out_shape=out_struct((g, kp, np_), out_dtype, lhs, dy, start, end),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=(nk, nn, num_visits),
          in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), dy_map)],
          out_specs=pl.BlockSpec((None, tk, tn), out_map),
          scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
      ),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=_interpret_arg(interpret, "visits"),
      name="moejax_tgmm_visits",
  )(group, tile, active, start, end, lhs, dy)


# ----------------------------------------------------------------------------------------------
# `tiles` kernels (GPU Triton; the CPU interprets them).

def _gmm_tiles(lhs, rhs, start, end, tiling: Tiling, transpose_rhs: bool, out_dtype,
               interpret):
  """lhs [Mp, Kp], rhs [G, Kp, Np] (or [G, Np, Kp] when transpose_rhs) -> [Mp, Np]."""
  tm, tk, tn = tiling
  mp, kp = lhs.shape
  np_ = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  nt, nk, nn = mp // tm, kp // tk, np_ // tn
  # Groups touching row tile i: [lo_i, hi_i); empty groups inside that range add nothing.
  tile_start = jnp.arange(nt, dtype=jnp.int32) * tm
  lo = jnp.sum(end[None, :] <= tile_start[:, None], axis=1, dtype=jnp.int32)        # [NT]
  hi = jnp.sum(start[None, :] < tile_start[:, None] + tm, axis=1, dtype=jnp.int32)  # [NT]
  hi = jnp.maximum(hi, lo)

  def kernel(lo_ref, hi_ref, start_ref, end_ref, lhs_ref, rhs_ref, out_ref):
    i, j = pl.program_id(0), pl.program_id(1)
    r0 = pl.multiple_of(i * tm, tm)
    c0 = pl.multiple_of(j * tn, tn)
    rows = r0 + jnp.arange(tm, dtype=jnp.int32)

    def group_step(gi, acc):
      mask = (rows >= start_ref[gi]) & (rows < end_ref[gi])

      def k_step(kk, acc):
        k0 = pl.multiple_of(kk * tk, tk)
        x = lhs_ref[pl.ds(r0, tm), pl.ds(k0, tk)]
        x = jnp.where(mask[:, None], x, jnp.zeros_like(x))
        if transpose_rhs:
          w = rhs_ref[gi, pl.ds(c0, tn), pl.ds(k0, tk)]
          dims = (((1,), (1,)), ((), ()))
        else:
          w = rhs_ref[gi, pl.ds(k0, tk), pl.ds(c0, tn)]
          dims = (((1,), (0,)), ((), ()))
        return acc + jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)

      return jax.lax.fori_loop(0, nk, k_step, acc)

    acc = jax.lax.fori_loop(lo_ref[i], hi_ref[i], group_step,
                            jnp.zeros((tm, tn), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)

  whole = pl.BlockSpec()
  return pl.pallas_call(
      kernel,
      out_shape=out_struct((mp, np_), out_dtype, lhs, rhs, start, end),
      grid=(nt, nn),
      in_specs=[whole] * 6,
      out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
      interpret=_interpret_arg(interpret, "tiles"),
      name="moejax_gmm_tiles",
  )(lo, hi, start, end, lhs, rhs)


def _tgmm_tiles(lhs, dy, start, end, tiling: Tiling, out_dtype, interpret):
  """lhs [Mp, Kp], dy [Mp, Np] -> [G, Kp, Np]."""
  tm, tk, tn = tiling
  mp, kp = lhs.shape
  np_ = dy.shape[1]
  g = start.shape[0]
  nk, nn = kp // tk, np_ // tn

  def kernel(start_ref, end_ref, lhs_ref, dy_ref, out_ref):
    gi, kk, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    k0 = pl.multiple_of(kk * tk, tk)
    c0 = pl.multiple_of(j * tn, tn)
    s, e = start_ref[gi], end_ref[gi]
    first = s // tm
    last = jnp.where(e > s, (e + tm - 1) // tm, first)     # row tiles [first, last) of group gi

    def row_step(t, acc):
      r0 = pl.multiple_of(t * tm, tm)
      rows = r0 + jnp.arange(tm, dtype=jnp.int32)
      mask = (rows >= s) & (rows < e)
      x = lhs_ref[pl.ds(r0, tm), pl.ds(k0, tk)]
      x = jnp.where(mask[:, None], x, jnp.zeros_like(x))
      d = dy_ref[pl.ds(r0, tm), pl.ds(c0, tn)]
      return acc + jax.lax.dot_general(x, d, (((0,), (0,)), ((), ())),
                                       preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(first, last, row_step, jnp.zeros((tk, tn), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)

  whole = pl.BlockSpec()
  return pl.pallas_call(
      kernel,
      out_shape=out_struct((g, kp, np_), out_dtype, lhs, dy, start, end),
      grid=(g, nk, nn),
      in_specs=[whole] * 4,
      out_specs=pl.BlockSpec((None, tk, tn), lambda gi, kk, j: (gi, kk, j)),
      interpret=_interpret_arg(interpret, "tiles"),
      name="moejax_tgmm_tiles",
  )(start, end, lhs, dy)


# ----------------------------------------------------------------------------------------------
# Padding, dispatch to a kernel, and the differentiable API.

def _resolve(m, k, n, tiling, interpret, kernel):
  kernel = kernel or _default_kernel()
  if kernel not in KERNELS:
    raise ValueError(f"kernel={kernel!r}: expected one of {KERNELS}")
  if interpret is None:      # compile where the kernel has a lowering, interpret elsewhere
    interpret = jax.default_backend() != {"visits": "tpu", "tiles": "gpu"}[kernel]
  t = Tiling(*tiling) if tiling is not None else default_tiling(m, k, n, kernel)
  return t, bool(interpret), kernel


def _gmm_padded(lhs, rhs, group_sizes, tiling, interpret, kernel, transpose_rhs, out_dtype):
  """The kernel call on operands padded to whole tiles, cut back to [M, N]."""
  lhs, rhs, group_sizes = vary_alike(lhs, rhs, group_sizes)
  m, k = lhs.shape
  g = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  (tm, tk, tn), interpret, kernel = _resolve(m, k, n, tiling, interpret, kernel)
  mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
  start, end = _group_bounds(group_sizes, m)
  lhs_p = _pad_to(lhs, (mp, kp))
  rhs_p = _pad_to(rhs, (g, np_, kp) if transpose_rhs else (g, kp, np_))
  call = _gmm_visits if kernel == "visits" else _gmm_tiles
  out = call(lhs_p, rhs_p, start, end, Tiling(tm, tk, tn), transpose_rhs, out_dtype, interpret)
  return out[:m, :n]


def _tgmm_padded(lhs, dy, group_sizes, tiling, interpret, kernel, out_dtype):
  lhs, dy, group_sizes = vary_alike(lhs, dy, group_sizes)
  m, k = lhs.shape
  n = dy.shape[1]
  (tm, tk, tn), interpret, kernel = _resolve(m, k, n, tiling, interpret, kernel)
  mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
  start, end = _group_bounds(group_sizes, m)
  call = _tgmm_visits if kernel == "visits" else _tgmm_tiles
  out = call(_pad_to(lhs, (mp, kp)), _pad_to(dy, (mp, np_)), start, end, Tiling(tm, tk, tn),
             out_dtype, interpret)
  return out[:, :k, :n]


def tgmm(lhs: jax.Array, dy: jax.Array, group_sizes: jax.Array, *, tiling=None,
         interpret: bool | None = None, kernel: str | None = None,
         out_dtype=None) -> jax.Array:
  """Per-group lhs^T @ dy: the weight gradient of `gmm` (MegaBlocks, arXiv:2211.15841).

  Args:
    lhs: [M, K] rows sorted by group.
    dy: [M, N] rows in the same order.
    group_sizes: [G] int rows per group (a total above M is cut at M).
    tiling: (tm, tk, tn) or None for `default_tiling`.
    interpret: run the kernel in the Pallas interpreter; None: only where `kernel` has no
      lowering (the CPU).
    kernel: "visits" or "tiles"; None: "visits" on a TPU, "tiles" elsewhere.
    out_dtype: default lhs.dtype. Accumulation is float32 either way.
  Returns:
    [G, K, N]; zeros for empty groups.
  """
  return _tgmm_padded(lhs, dy, group_sizes, tiling, interpret, kernel,
                      jnp.dtype(out_dtype or lhs.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm_vjp(lhs, rhs, group_sizes, tiling, interpret, kernel):
  return _gmm_padded(lhs, rhs, group_sizes, tiling, interpret, kernel, False, lhs.dtype)


def _gmm_vjp_fwd(lhs, rhs, group_sizes, tiling, interpret, kernel):
  return _gmm_vjp(lhs, rhs, group_sizes, tiling, interpret, kernel), (lhs, rhs, group_sizes)


def _gmm_vjp_bwd(tiling, interpret, kernel, res, dy):
  lhs, rhs, group_sizes = res
  dy = dy.astype(lhs.dtype)        # bfloat16 operands: bfloat16 backward matmuls, f32 sums
  # d lhs = dy @ rhs[g]^T, reading rhs [G, K, N] in place as [G, "N", "K"] (no transpose copy).
  d_lhs = _gmm_padded(dy, rhs, group_sizes, _swap_kn(tiling), interpret, kernel, True,
                      lhs.dtype)
  d_rhs = _tgmm_padded(lhs, dy, group_sizes, tiling, interpret, kernel, rhs.dtype)
  return like_primal(d_lhs, lhs), like_primal(d_rhs, rhs), None


def _swap_kn(tiling):
  return None if tiling is None else Tiling(tiling[0], tiling[2], tiling[1])


_gmm_vjp.defvjp(_gmm_vjp_fwd, _gmm_vjp_bwd)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, tiling=None,
        interpret: bool | None = None, kernel: str | None = None) -> jax.Array:
  """Grouped matmul as a Pallas kernel (MegaBlocks' grouped GEMM, arXiv:2211.15841).

  Differentiable in lhs and rhs (custom VJP: d lhs = gmm(dy, rhs^T) reading rhs in place,
  d rhs = tgmm(lhs, dy)); the cotangent is rounded to lhs.dtype, so bfloat16 operands give
  bfloat16 backward matmuls, all accumulated in float32.

  Args:
    lhs: [M, K] rows sorted by group.
    rhs: [G, K, N] one matrix per group.
    group_sizes: [G] int rows per group; sum <= M (a larger total is cut at M).
    tiling: (tm, tk, tn) block sizes, or None for `default_tiling(M, K, N, kernel)`; M, K and N
      are zero-padded up to whole blocks.
    interpret: run in the Pallas interpreter; None: interpret only where `kernel` has no
      compiled lowering (always on the CPU).
    kernel: "visits" (TPU Mosaic) or "tiles" (GPU Triton); None picks by platform ("visits" on
      a TPU, "tiles" elsewhere). Both run anywhere in interpret mode.
  Returns:
    [M, N] in lhs.dtype; rows past sum(group_sizes) are zeros.
  """
  if tiling is not None:
    tiling = Tiling(*tiling)
  return _gmm_vjp(lhs, rhs, group_sizes, tiling, interpret, kernel)


def pallas_gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """`gmm` with its defaults: the `pallas` entry of `GMM_BACKENDS` (arXiv:2211.15841)."""
  return gmm(lhs, rhs, group_sizes)
