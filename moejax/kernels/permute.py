"""Permute (tokens -> expert-sorted copies) and unpermute-and-combine, with their own VJPs, and a
grouped matmul that reads its rows through the sort index so the permuted copy of the
activations is never materialised.

Notation: T tokens, K copies per token (top-k), M = T*K copies, D width. `sort_index` [M] is the
order of the copies sorted by expert (copy c = token c // K, slot c % K); `inverse` [M] its
inverse permutation (inverse[sort_index[i]] = i).

- `permute(x [T, D], sort_index, inverse, top_k) -> xs [M, D]`, xs[i] = x[sort_index[i] // K].
  Backward: dx[t] = sum_k dxs[inverse[t*K + k]], a gather and a sum, never a scatter-add
  (MaxText's permute, as in moejax's dispatch).
- `unpermute_combine(ys [M, D], sort_index, inverse, weights [T, K]) -> y [T, D]`,
  y[t] = sum_k weights[t, k] * ys[inverse[t*K + k]]: the unpermute and the weighted sum over the
  K copies in one pass, without the [T, K, D] intermediate. Backward: d ys[i] =
  weights[c] * dy[c // K] with c = sort_index[i] (a gather), d weights[t, k] =
  <dy[t], ys[inverse[t*K + k]]>.
- `gather_gmm(x [T, D], rhs [E, D, N], group_sizes, sort_index, inverse, top_k) -> [M, N]`
  = gmm(permute(x, ...), rhs, group_sizes) without the [M, D] copy (ScatterMoE's fused gather,
  "Scattered Mixture-of-Experts Implementation", Tan et al. 2024, arXiv:2403.08245). It follows
  `chunked`'s walk over the experts, gathering each chunk's rows from x as it multiplies them;
  the residuals it keeps are x and the indices, not the [M, D] permuted copy, which saves
  (K - 1) * T * D elements per layer for the backward pass.

Row gathers run either as XLA gathers (`jnp.take`: the default on the CPU and the TPU) or as a
Pallas row-gather kernel (the default on a GPU, where it lowers through Triton; the tests run it
in the interpreter). The Pallas kernel reads whole-array refs, so on a TPU (whose VMEM cannot
hold them) it is only for interpret mode.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from moejax.kernels import chunked as _chunked
from moejax.kernels.vma import like_primal, out_struct, vary_alike, varying_zeros

GATHER_ROWS = 16      # rows one program of the Pallas gather copies


def _pow2_at_least(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def _gather_rows_pallas(x: jax.Array, index: jax.Array, interpret: bool) -> jax.Array:
  """x [R, D], index [S] (all < R) -> [S, D]; one program copies GATHER_ROWS rows."""
  x, index = vary_alike(x, index)
  s = index.shape[0]
  d = x.shape[1]
  ts = GATHER_ROWS
  td = min(_pow2_at_least(d), 512)                  # Triton blocks are powers of two
  sp, dp = -(-s // ts) * ts, -(-d // td) * td
  index = jnp.pad(index.astype(jnp.int32), (0, sp - s))
  x = jnp.pad(x, ((0, 0), (0, dp - d))) if dp != d else x

  def kernel(index_ref, x_ref, out_ref):
    i, j = pl.program_id(0), pl.program_id(1)
    c0 = pl.multiple_of(j * td, td)

    def row(r, carry):
      src = index_ref[i * ts + r]
      out_ref[pl.ds(r, 1), :] = x_ref[pl.ds(src, 1), pl.ds(c0, td)]
      return carry

    jax.lax.fori_loop(0, ts, row, 0)

  out = pl.pallas_call(
      kernel,
      out_shape=out_struct((sp, dp), x.dtype, x, index),
      grid=(sp // ts, dp // td),
      in_specs=[pl.BlockSpec(), pl.BlockSpec()],
      out_specs=pl.BlockSpec((ts, td), lambda i, j: (i, j)),
      interpret=interpret,
      name="moejax_gather_rows",
  )(index, x)
  return out[:s, :d]


def gather_rows(x: jax.Array, index: jax.Array, *, kernel: str | None = None,
                interpret: bool | None = None) -> jax.Array:
  """x [R, D], index [S] int (all in [0, R)) -> x[index] [S, D] (a row gather, MaxText-style
  permutation for MoE, "MegaBlocks", arXiv:2211.15841).

  Args:
    kernel: "pallas" or "xla"; None: "pallas" on a GPU, "xla" elsewhere.
    interpret: for "pallas": None interprets off the GPU.
  """
  kernel = kernel or ("pallas" if jax.default_backend() == "gpu" else "xla")
  if kernel == "xla":
    return jnp.take(x, index, axis=0, indices_are_sorted=False, mode="clip")
  if kernel != "pallas":
    raise ValueError(f"kernel={kernel!r}: expected 'pallas' or 'xla'")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  return _gather_rows_pallas(x, index, bool(interpret))


# ----------------------------------------------------------------------------- permute


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _permute(x, sort_index, inverse, top_k, kernel, interpret):
  return gather_rows(x, sort_index // top_k, kernel=kernel, interpret=interpret)


def _permute_fwd(x, sort_index, inverse, top_k, kernel, interpret):
  return _permute(x, sort_index, inverse, top_k, kernel, interpret), inverse


def _permute_bwd(top_k, kernel, interpret, inverse, dxs):
  dx = gather_rows(dxs, inverse, kernel=kernel, interpret=interpret)
  return dx.reshape(-1, top_k, dxs.shape[-1]).sum(axis=1, dtype=dxs.dtype), None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


def permute(x: jax.Array, sort_index: jax.Array, inverse: jax.Array, top_k: int, *,
            kernel: str | None = None, interpret: bool | None = None) -> jax.Array:
  """Token copies in expert order (MegaBlocks' permute, arXiv:2211.15841).

  Args:
    x: [T, D] tokens.
    sort_index: [M = T*K] int32, copies sorted by expert.
    inverse: [M] int32, the inverse permutation of sort_index.
    top_k: K.
    kernel, interpret: as `gather_rows`.
  Returns:
    xs [M, D], xs[i] = x[sort_index[i] // K]. Backward: a gather by `inverse` and a sum over the
    K copies of each token.
  """
  return _permute(x, sort_index, inverse, top_k, kernel, interpret)


# ----------------------------------------------------------------------------- unpermute + combine


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _unpermute_combine(ys, sort_index, inverse, weights, kernel, interpret):
  t, k = weights.shape
  y_copies = gather_rows(ys, inverse, kernel=kernel, interpret=interpret).reshape(t, k, -1)
  return jnp.einsum("tk,tkd->td", weights.astype(ys.dtype), y_copies,
                    preferred_element_type=jnp.float32).astype(ys.dtype)


def _unpermute_combine_fwd(ys, sort_index, inverse, weights, kernel, interpret):
  out = _unpermute_combine(ys, sort_index, inverse, weights, kernel, interpret)
  return out, (ys, sort_index, inverse, weights)


def _unpermute_combine_bwd(kernel, interpret, res, dy):
  ys, sort_index, inverse, weights = res
  t, k = weights.shape
  w_sorted = jnp.take(weights.reshape(-1), sort_index)                        # [M]
  d_ys = gather_rows(dy, sort_index // k, kernel=kernel, interpret=interpret)  # [M, D]
  d_ys = (d_ys * w_sorted[:, None].astype(d_ys.dtype)).astype(ys.dtype)
  y_copies = gather_rows(ys, inverse, kernel=kernel, interpret=interpret).reshape(t, k, -1)
  d_w = jnp.einsum("td,tkd->tk", dy, y_copies, preferred_element_type=jnp.float32)
  return d_ys, None, None, d_w.astype(weights.dtype)


_unpermute_combine.defvjp(_unpermute_combine_fwd, _unpermute_combine_bwd)


def unpermute_combine(ys: jax.Array, sort_index: jax.Array, inverse: jax.Array,
                      weights: jax.Array, *, kernel: str | None = None,
                      interpret: bool | None = None) -> jax.Array:
  """Expert outputs back in token order, weighted and summed over each token's K copies
  (MegaBlocks' unpermute, arXiv:2211.15841, fused with the combine).

  Args:
    ys: [M, D] expert outputs in expert order.
    sort_index, inverse: [M] int32, as for `permute`.
    weights: [T, K] combine weights (float32 from the router; differentiable).
    kernel, interpret: as `gather_rows`.
  Returns:
    y [T, D] in ys.dtype, y[t] = sum_k weights[t, k] * ys[inverse[t*K + k]], summed in float32.
  """
  return _unpermute_combine(ys, sort_index, inverse, weights, kernel, interpret)


# ----------------------------------------------------------------------------- fused gather gmm


def _gather_gmm_fwd_impl(x, rhs, group_sizes, row_index, tm, tmin):
  """gmm(x[row_index], rhs) with x's rows gathered chunk by chunk: [M, N] in x.dtype."""
  m = row_index.shape[0]
  e, _, n = rhs.shape
  start, size = _chunked._bounds(group_sizes, m)

  def expert(i, out):
    w = jax.lax.dynamic_index_in_dim(rhs, i, 0, keepdims=False)

    def rows(row, c):
      return jnp.take(x, jax.lax.dynamic_slice_in_dim(row_index, row, c, 0), axis=0)

    def full(out, row, c):
      y = _chunked._matmul(rows(row, c), w, False).astype(out.dtype)
      return jax.lax.dynamic_update_slice_in_dim(out, y, row, 0)

    def part(out, win, mask):
      y = _chunked._matmul(rows(win, tmin), w, False).astype(out.dtype)
      old = jax.lax.dynamic_slice_in_dim(out, win, tmin, 0)
      return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(mask[:, None], y, old), win, 0)

    return _chunked._walk(m, start[i], size[i], tm, tmin, out, full, part)

  return jax.lax.fori_loop(0, e, expert,
                           varying_zeros((m, n), x.dtype, x, rhs, group_sizes, row_index))


def _gather_tgmm_impl(x, dy, group_sizes, row_index, tm, tmin, out_dtype):
  """Per-expert x[row_index]^T @ dy, gathering x's rows chunk by chunk: [E, D, N]."""
  m = row_index.shape[0]
  d, n, e = x.shape[1], dy.shape[1], group_sizes.shape[0]
  start, size = _chunked._bounds(group_sizes, m)
  tdims = (((0,), (0,)), ((), ()))

  def expert(i, out):
    def full(acc, row, c):
      xr = jnp.take(x, jax.lax.dynamic_slice_in_dim(row_index, row, c, 0), axis=0)
      dr = jax.lax.dynamic_slice_in_dim(dy, row, c, 0)
      return acc + jax.lax.dot_general(xr, dr, tdims, preferred_element_type=jnp.float32)

    def part(acc, win, mask):
      xr = jnp.take(x, jax.lax.dynamic_slice_in_dim(row_index, win, tmin, 0), axis=0)
      xr = jnp.where(mask[:, None], xr, jnp.zeros_like(xr))
      dr = jax.lax.dynamic_slice_in_dim(dy, win, tmin, 0)
      return acc + jax.lax.dot_general(xr, dr, tdims, preferred_element_type=jnp.float32)

    acc = _chunked._walk(m, start[i], size[i], tm, tmin,
                         varying_zeros((d, n), jnp.float32, x, dy, row_index), full, part)
    return jax.lax.dynamic_update_index_in_dim(out, acc.astype(out.dtype), i, 0)

  return jax.lax.fori_loop(0, e, expert,
                           varying_zeros((e, d, n), out_dtype, x, dy, group_sizes, row_index))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _gather_gmm(x, rhs, group_sizes, sort_index, inverse, top_k, tm, tmin):
  return _gather_gmm_fwd_impl(x, rhs, group_sizes, sort_index // top_k, tm, tmin)


def _gather_gmm_fwd(x, rhs, group_sizes, sort_index, inverse, top_k, tm, tmin):
  out = _gather_gmm_fwd_impl(x, rhs, group_sizes, sort_index // top_k, tm, tmin)
  return out, (x, rhs, group_sizes, sort_index, inverse)    # x [T, D], not the [M, D] copy


def _gather_gmm_bwd(top_k, tm, tmin, res, dy):
  x, rhs, group_sizes, sort_index, inverse = res
  dy = dy.astype(x.dtype)
  d_xs = _chunked._gmm(dy, rhs, group_sizes, tm, tmin, True)                   # [M, D]
  dx = jnp.take(d_xs, inverse, axis=0).reshape(-1, top_k, x.shape[1]).sum(axis=1)
  d_rhs = _gather_tgmm_impl(x, dy, group_sizes, sort_index // top_k, tm, tmin, rhs.dtype)
  return like_primal(dx.astype(x.dtype), x), like_primal(d_rhs, rhs), None, None, None


_gather_gmm.defvjp(_gather_gmm_fwd, _gather_gmm_bwd)


def gather_gmm(x: jax.Array, rhs: jax.Array, group_sizes: jax.Array, sort_index: jax.Array,
               inverse: jax.Array, top_k: int, *, tm: int | None = None,
               tmin: int | None = None) -> jax.Array:
  """Grouped matmul of the token copies in expert order, reading the rows of x through the sort
  index (ScatterMoE's fused gather, Tan et al. 2024, arXiv:2403.08245): equals
  `chunked_gmm(permute(x, sort_index, inverse, top_k), rhs, group_sizes)` without building the
  permuted [M, D] copy, in the forward pass or as a residual for the backward pass.

  Args:
    x: [T, D] tokens in token order.
    rhs: [E, D, N] one matrix per expert.
    group_sizes: [E] int copies per expert, sum = M = T*K (a smaller sum leaves zero rows).
    sort_index: [M] int32, copies sorted by expert (copy c = token c // K).
    inverse: [M] int32, inverse permutation of sort_index.
    top_k: K (static).
    tm, tmin: chunk sizes as in `chunked_gmm`.
  Returns:
    [M, N] in x.dtype, in expert order (feed it to the next gmm, or to `unpermute_combine`).
  """
  m = sort_index.shape[0]
  tm = _chunked._pow2_floor(min(tm or _chunked.CHUNK, m))
  tmin = min(_chunked._pow2_floor(tmin or _chunked.CHUNK_MIN), tm)
  return _gather_gmm(x, rhs, group_sizes, sort_index, inverse, top_k, tm, tmin)
