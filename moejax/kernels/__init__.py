"""Grouped-matmul backends, looked up by `model.moe.gmm_backend`.

A backend is `gmm(lhs [M, K], rhs [E, K, N], group_sizes [E]) -> [M, N]`: rows of `lhs` come
sorted by expert, the first group_sizes[0] rows use rhs[0], the next group_sizes[1] use rhs[1],
and so on (the MegaBlocks formulation, "MegaBlocks: Efficient Sparse Training with Mixture-of-
Experts", Gale et al. 2022, arXiv:2211.15841). Rows past sum(group_sizes) give zeros.
"""
from moejax.kernels.reference import ragged_dot_gmm

GMM_BACKENDS = {
    "ragged_dot": ragged_dot_gmm,
}
