"""Grouped-matmul backends, looked up by `model.moe.gmm_backend`.

A backend is `gmm(lhs [M, K], rhs [E, K, N], group_sizes [E]) -> [M, N]`: rows of `lhs` come
sorted by expert, the first group_sizes[0] rows use rhs[0], the next group_sizes[1] use rhs[1],
and so on (the MegaBlocks formulation, "MegaBlocks: Efficient Sparse Training with Mixture-of-
Experts", Gale et al. 2022, arXiv:2211.15841). Rows past sum(group_sizes) give zeros.

- `ragged_dot`: `jax.lax.ragged_dot` (`reference.py`). On the CPU, and on the GPU with jax
  0.11.2, it is lowered to a dense matmul over all E experts for every row (E times the FLOPs).
- `blocked`: pure-JAX block-sparse tiles (`blocked.py`): rows padded per expert to a multiple of
  a row tile, one batched matmul over tiles. Real FLOPs plus bounded padding on every platform.
- `chunked`: pure JAX, a loop over experts multiplying each expert's sorted rows in place in
  static-size chunks (`chunked.py`); at most CHUNK_MIN - 1 wasted rows per expert, no copies of
  the weights or the rows. Meant for XLA:CPU.
- `pallas`: Pallas kernels (`gmm.py`): Mosaic on a TPU, Triton on a GPU, the Pallas interpreter
  on the CPU (correct but slow there: for tests).
- `tokamax`: `tokamax.ragged_dot` (`tokamax_gmm.py`), only when the optional `tokamax` package is
  installed (`pip install -e '.[tokamax]'`).

Permute and combine kernels for dropless dispatch, and a grouped matmul that reads its rows
through the sort index, are in `permute.py` (not backends: dispatch calls them directly).
"""
import importlib.util

from moejax.kernels.blocked import blocked_gmm
from moejax.kernels.chunked import chunked_gmm
from moejax.kernels.gmm import pallas_gmm
from moejax.kernels.reference import ragged_dot_gmm

GMM_BACKENDS = {
    "ragged_dot": ragged_dot_gmm,
    "blocked": blocked_gmm,
    "chunked": chunked_gmm,
    "pallas": pallas_gmm,
}

if importlib.util.find_spec("tokamax") is not None:
  from moejax.kernels.tokamax_gmm import tokamax_gmm
  GMM_BACKENDS["tokamax"] = tokamax_gmm
