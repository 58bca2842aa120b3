"""The permutation of token copies into expert order and back, with gather-only VJPs (the
sort/permute half of MegaBlocks, "MegaBlocks: Efficient Sparse Training with Mixture-of-Experts",
Gale et al. 2022, arXiv:2211.15841, in the form of MaxText's MoE permute)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def sort_by_expert(expert_index: jax.Array) -> jax.Array:
  """Order of the T*K token copies sorted by expert, ties in (token, slot) order; "no expert"
  slots (index E) come last.

  Args:
    expert_index: [T, K].
  Returns:
    sort_index [T*K] int32: position i of the sorted buffer holds copy sort_index[i], which is
    token sort_index[i] // K.
  """
  return jnp.argsort(expert_index.reshape(-1), stable=True).astype(jnp.int32)


def inverse_permutation(sort_index: jax.Array) -> jax.Array:
  """inverse [N] with inverse[sort_index[i]] = i (a scatter of iota; cheaper than an argsort)."""
  n = sort_index.shape[0]
  return jnp.zeros((n,), jnp.int32).at[sort_index].set(jnp.arange(n, dtype=jnp.int32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def permute(x: jax.Array, sort_index: jax.Array, inverse: jax.Array, top_k: int) -> jax.Array:
  """Gathers token copies into expert order: x [T, D] -> xs [T*K, D], xs[i] = x[sort_index[i]//K].

  `inverse` [T*K] is `inverse_permutation(sort_index)`. The backward pass is a gather by the
  inverse permutation and a sum over the K copies of each token, never a scatter-add (as in
  MaxText's MoE permute).
  """
  del inverse
  return x[sort_index // top_k]


def _permute_fwd(x, sort_index, inverse, top_k):
  return permute(x, sort_index, inverse, top_k), inverse


def _permute_bwd(top_k, inverse, dxs):
  dx = dxs[inverse].reshape(-1, top_k, dxs.shape[-1]).sum(axis=1)
  return dx, None, None


permute.defvjp(_permute_fwd, _permute_bwd)


@jax.custom_vjp
def unpermute(ys: jax.Array, sort_index: jax.Array, inverse: jax.Array) -> jax.Array:
  """Inverse of `permute` before the reduction: ys [T*K, D] in expert order -> [T*K, D] in copy
  order (copy c = token c // K, slot c % K). Backward is the forward gather, by sort_index."""
  del sort_index
  return ys[inverse]


def _unpermute_fwd(ys, sort_index, inverse):
  return unpermute(ys, sort_index, inverse), sort_index


def _unpermute_bwd(sort_index, dy):
  return dy[sort_index], None, None


unpermute.defvjp(_unpermute_fwd, _unpermute_bwd)


def combine(y_copies: jax.Array, combine_weights: jax.Array) -> jax.Array:
  """Each token's weighted sum of its K expert outputs: y_copies [T, K, D], combine_weights
  [T, K] -> [T, D] (a "no expert" slot has weight 0)."""
  return jnp.einsum("tk,tkd->td", combine_weights.astype(y_copies.dtype), y_copies)
