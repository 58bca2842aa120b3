"""Pure-JAX reference grouped matmul, always available on every platform."""
import jax
import jax.numpy as jnp


def ragged_dot_gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """Grouped matmul via `jax.lax.ragged_dot` (MegaBlocks' grouped GEMM, arXiv:2211.15841).

  Args:
    lhs: [M, K] rows sorted by group.
    rhs: [E, K, N] one matrix per group.
    group_sizes: [E] int32 rows per group; sum <= M.
  Returns:
    [M, N] in lhs.dtype, accumulated in float32.
  """
  out = jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32),
                           preferred_element_type=jnp.float32)
  return out.astype(lhs.dtype)
