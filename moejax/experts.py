"""Feed-forward blocks: the dense FFN, the expert bank, and the shared experts.

All three apply the same FFN form (`FFN_FORMS`) and differ only in the matmul they hand it:
a plain dot (dense, shared), a batched einsum over the expert axis (capacity dispatch), or a
grouped matmul over ragged expert groups (dropless dispatch).
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.kernels import GMM_BACKENDS
from moejax.params import logical_param


def swiglu(x, w, matmul):
  """SwiGLU FFN: (silu(x W_gate) * x W_up) W_down ("GLU Variants Improve Transformer",
  Shazeer 2020, arXiv:2002.05202)."""
  return matmul(jax.nn.silu(matmul(x, w["gate"])) * matmul(x, w["up"]), w["down"])


def gelu(x, w, matmul):
  """GeLU FFN: gelu(x W_up) W_down ("Gaussian Error Linear Units", Hendrycks & Gimpel 2016,
  arXiv:1606.08415)."""
  return matmul(jax.nn.gelu(matmul(x, w["up"])), w["down"])


# name -> (ffn function, weight names that map D -> F)
FFN_FORMS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "swiglu": (swiglu, ("gate", "up")),
    "gelu": (gelu, ("up",)),
}


def num_ffn_matrices(ffn_type: str) -> int:
  """Weight matrices of one FFN of this form: the D -> F ones plus the F -> D one."""
  return len(FFN_FORMS[ffn_type][1]) + 1


class MLP(nnx.Module):
  """Dense FFN of width F (a dense layer's FFN, or DeepSeekMoE's always-on shared experts,
  Dai et al. 2024, arXiv:2401.06066, concatenated into one FFN of their summed width)."""

  def __init__(self, d_model: int, width: int, ffn_type: str, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.ffn_type, self.dtype = ffn_type, dtype
    _, in_names = FFN_FORMS[ffn_type]
    self.w = nnx.Dict({n: logical_param(rngs, (d_model, width), d_model ** -0.5,
                                        ("embed", "mlp"), param_dtype) for n in in_names})
    self.w["down"] = logical_param(rngs, (width, d_model), width ** -0.5, ("mlp", "embed"),
                                   param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., D] -> [..., D]."""
    w = {n: p[...].astype(self.dtype) for n, p in self.w.items()}
    return FFN_FORMS[self.ffn_type][0](x.astype(self.dtype), w, jnp.dot)


class ExpertBank(nnx.Module):
  """E experts of width F with weights stacked on a leading expert axis: [E, D, F], [E, F, D]
  (GShard, arXiv:2006.16668), so the expert axis can be sharded over the mesh."""

  def __init__(self, num_experts: int, d_model: int, width: int, ffn_type: str, *,
               rngs: nnx.Rngs, gmm_backend: str = "blocked", dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.ffn_type, self.dtype, self.gmm_backend = ffn_type, dtype, gmm_backend
    _, in_names = FFN_FORMS[ffn_type]
    self.w = nnx.Dict({
        n: logical_param(rngs, (num_experts, d_model, width), d_model ** -0.5,
                         ("expert", "embed", "expert_mlp"), param_dtype) for n in in_names})
    self.w["down"] = logical_param(rngs, (num_experts, width, d_model), width ** -0.5,
                                   ("expert", "expert_mlp", "embed"), param_dtype)

  def _weights(self):
    return {n: p[...].astype(self.dtype) for n, p in self.w.items()}

  def grouped(self, xs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Dropless: xs [M, D] sorted by expert, group_sizes [E] -> [M, D]."""
    gmm = functools.partial(GMM_BACKENDS[self.gmm_backend], group_sizes=group_sizes)
    return FFN_FORMS[self.ffn_type][0](xs.astype(self.dtype), self._weights(), gmm)

  def batched(self, xs: jax.Array) -> jax.Array:
    """Capacity: xs [E, C, D], one slab per expert -> [E, C, D]."""
    matmul = functools.partial(jnp.einsum, "ecd,edf->ecf")
    return FFN_FORMS[self.ffn_type][0](xs.astype(self.dtype), self._weights(), matmul)
