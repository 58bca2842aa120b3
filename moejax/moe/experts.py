"""Feed-forward blocks: the FFN forms, the dense FFN (and shared experts), and the expert bank.

The FFN forms are pure functions of (x, weights, matmul); the dense FFN, the shared experts and
the routed experts differ only in the matmul they hand the form: a plain dot (dense, shared), a
batched einsum over the expert axis (capacity dispatch), or a grouped matmul over ragged expert
groups (dropless dispatch). Dispatch receives the weights as a dict of arrays and an
`ExpertFFN` (the form, the grouped-matmul backend and the compute dtype), never a module, so
it can run inside `jax.shard_map`.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moejax import kernels
from moejax.kernels.permute import gather_gmm
from moejax.moe.dims import moe_dims
from moejax.params import logical_param
from moejax.registry import Registry


@dataclasses.dataclass(frozen=True)
class FFNForm:
  """An FFN form: `apply(x, w, matmul)` and the names of its D -> F weight matrices (the F -> D
  one is always `down`)."""
  apply: object
  in_names: tuple[str, ...]

  @property
  def num_matrices(self) -> int:
    """Weight matrices of one FFN of this form: the D -> F ones plus the F -> D one."""
    return len(self.in_names) + 1


def swiglu(x, w, matmul):
  """SwiGLU FFN: (silu(x W_gate) * x W_up) W_down ("GLU Variants Improve Transformer",
  Shazeer 2020, arXiv:2002.05202)."""
  return matmul(jax.nn.silu(matmul(x, w["gate"])) * matmul(x, w["up"]), w["down"])


def gelu(x, w, matmul):
  """GeLU FFN: gelu(x W_up) W_down ("Gaussian Error Linear Units", Hendrycks & Gimpel 2016,
  arXiv:1606.08415)."""
  return matmul(jax.nn.gelu(matmul(x, w["up"])), w["down"])


FFN_FORMS = Registry("model.moe.expert_type", {
    "swiglu": FFNForm(swiglu, ("gate", "up")),
    "gelu": FFNForm(gelu, ("up",)),
})

# Grouped-matmul backends (moejax/kernels, which imports nothing of moejax) under their names.
GMM_BACKENDS = Registry("model.moe.gmm_backend", kernels.GMM_BACKENDS)


def num_ffn_matrices(expert_type: str) -> int:
  """Weight matrices of one FFN of form `expert_type`."""
  return FFN_FORMS[expert_type].num_matrices


@dataclasses.dataclass(frozen=True)
class ExpertFFN:
  """How the expert weights are applied: static, hashable, safe to close over in shard_map.

  Attributes:
    form: an `FFN_FORMS` name.
    gmm_backend: a `GMM_BACKENDS` name (dropless dispatch).
    dtype: compute dtype name.
  """
  form: str
  gmm_backend: str
  dtype: str

  def grouped(self, xs: jax.Array, w: dict, group_sizes: jax.Array) -> jax.Array:
    """Dropless: xs [M, D] sorted by expert, w {name: [E, D, F] / [E, F, D]}, group_sizes [E]
    -> [M, D]; rows past sum(group_sizes) give zeros."""
    gmm = functools.partial(GMM_BACKENDS[self.gmm_backend], group_sizes=group_sizes)
    return FFN_FORMS[self.form].apply(xs.astype(self.dtype), self._cast(w), gmm)

  def grouped_gathered(self, x: jax.Array, w: dict, group_sizes: jax.Array,
                       sort_index: jax.Array, inverse: jax.Array, top_k: int) -> jax.Array:
    """Dropless with the fused gather (ScatterMoE, "Scattered Mixture-of-Experts
    Implementation", Tan et al. 2024, arXiv:2403.08245): x [T, D] in token order; the D -> F
    matmuls read their rows through sort_index [T*K] (`kernels.gather_gmm`, `chunked`'s walk),
    the F -> D one is this FFN's grouped matmul -> [T*K, D] in expert order, as
    `grouped(permute(x, ...), ...)` without the [T*K, D] copy of x."""
    x = x.astype(self.dtype)
    gmm = functools.partial(GMM_BACKENDS[self.gmm_backend], group_sizes=group_sizes)

    def matmul(a, b):
      if a is x:                                   # a D -> F matrix applied to the tokens
        return gather_gmm(x, b, group_sizes, sort_index, inverse, top_k)
      return gmm(a, b)

    return FFN_FORMS[self.form].apply(x, self._cast(w), matmul)

  def batched(self, xs: jax.Array, w: dict) -> jax.Array:
    """Capacity: xs [E, C, D], one slab per expert -> [E, C, D]."""
    matmul = functools.partial(jnp.einsum, "ecd,edf->ecf")
    return FFN_FORMS[self.form].apply(xs.astype(self.dtype), self._cast(w), matmul)

  def _cast(self, w: dict) -> dict:
    return {n: v.astype(self.dtype) for n, v in w.items()}


class MLP(nnx.Module):
  """Dense FFN of width F (a dense layer's FFN, or DeepSeekMoE's always-on shared experts,
  "DeepSeekMoE: Towards Ultimate Expert Specialization in Mixture-of-Experts Language Models",
  Dai et al. 2024, arXiv:2401.06066, concatenated into one FFN of their summed width)."""

  def __init__(self, d_model: int, width: int, ffn_type: str, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.ffn_type, self.dtype = ffn_type, dtype
    form = FFN_FORMS[ffn_type]
    self.w = nnx.Dict({n: logical_param(rngs, (d_model, width), d_model ** -0.5,
                                        ("embed", "mlp"), param_dtype) for n in form.in_names})
    self.w["down"] = logical_param(rngs, (width, d_model), width ** -0.5, ("mlp", "embed"),
                                   param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., D] -> [..., D]."""
    w = {n: p[...].astype(self.dtype) for n, p in self.w.items()}
    return FFN_FORMS[self.ffn_type].apply(x.astype(self.dtype), w, jnp.dot)


class ExpertBank(nnx.Module):
  """E experts of width F with weights stacked on a leading expert axis: [E, D, F], [E, F, D]
  (GShard, arXiv:2006.16668), so the expert axis can be sharded over the mesh."""

  def __init__(self, num_experts: int, d_model: int, width: int, ffn_type: str, *,
               rngs: nnx.Rngs, gmm_backend: str = "blocked", dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.ffn = ExpertFFN(ffn_type, gmm_backend, jnp.dtype(dtype).name)
    form = FFN_FORMS[ffn_type]
    self.w = nnx.Dict({
        n: logical_param(rngs, (num_experts, d_model, width), d_model ** -0.5,
                         ("expert", "embed", "expert_mlp"), param_dtype) for n in form.in_names})
    self.w["down"] = logical_param(rngs, (num_experts, width, d_model), width ** -0.5,
                                   ("expert", "expert_mlp", "embed"), param_dtype)

  def weights(self) -> dict:
    """{name: array}: [E, D, F] for the D -> F matrices, [E, F, D] for `down`."""
    return {n: p[...] for n, p in self.w.items()}


class SharedExperts(MLP):
  """Always-on shared experts (one FFN of their summed width, as `MLP`) whose output is scaled
  per token by a learned sigmoid gate, sigmoid(x w_gate) * FFN(x): Qwen2-MoE's shared expert
  ("Qwen2 Technical Report", Yang et al. 2024, arXiv:2407.10671, sec. 2.2.2; the gate is
  `shared_expert_gate` of its reference implementation). `model.moe.shared_expert_gate`."""

  def __init__(self, d_model: int, width: int, ffn_type: str, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    super().__init__(d_model, width, ffn_type, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    # A vector, not [D, 1]: 1-D weights take no weight decay (moejax.train.make_optimizer).
    self.gate = logical_param(rngs, (d_model,), d_model ** -0.5, ("embed",), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., D] -> [..., D]."""
    g = jax.nn.sigmoid(jnp.dot(x.astype(self.dtype), self.gate[...].astype(self.dtype)))
    return g[..., None] * super().__call__(x)


def shared_experts(model: ml_collections.ConfigDict, rngs: nnx.Rngs):
  """The always-on shared experts of `model.moe.num_shared_experts` of an MoE layer (DeepSeekMoE,
  arXiv:2401.06066; gated as Qwen2-MoE with `shared_expert_gate`), or None."""
  moe, dims = model.moe, moe_dims(model)
  if not dims.shared_width:
    return None
  cls = SharedExperts if moe.get("shared_expert_gate", False) else MLP
  return cls(model.d_model, dims.shared_width, moe.expert_type, rngs=rngs,
             dtype=jnp.dtype(model.dtype), param_dtype=jnp.dtype(model.param_dtype))
