"""Optional backend `tokamax`: Google's Pallas kernel library's grouped matmul.

Installed by `pip install -e '.[tokamax]'`; registered in `GMM_BACKENDS` only when the package
is importable, and imported on first use (it pulls in pydantic and qwix).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def tokamax_gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """Grouped matmul via `tokamax.ragged_dot` (MegaBlocks' grouped GEMM, arXiv:2211.15841).

  tokamax picks its implementation per platform (Mosaic on a TPU, Triton on a GPU, XLA's
  `ragged_dot` elsewhere, which on the CPU is a dense matmul over all E experts).

  Args:
    lhs: [M, K] rows sorted by group.
    rhs: [E, K, N] one matrix per group.
    group_sizes: [E] int rows per group; sum <= M.
  Returns:
    [M, N] in lhs.dtype, accumulated in float32.
  """
  import tokamax  # noqa: PLC0415  optional dependency, imported on first use
  from absl import flags  # noqa: PLC0415

  # tokamax reads its options from absl flags and, if nobody parsed them (pytest, a notebook, a
  # benchmark script), parses sys.argv, which fails on any foreign argument ("-q"). Outside an
  # absl app the flags keep their defaults.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  out = tokamax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32),
                           preferred_element_type=jnp.float32)
  return out.astype(lhs.dtype)
