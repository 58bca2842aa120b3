"""Parameter and training-FLOP accounting for a moejax config, dense or MoE.

Parameters follow moejax.model exactly: per layer Wq [D, H, Dh], Wk and Wv [D, KV, Dh],
Wo [H, Dh, D], two RMSNorm scales [D]; a dense FFN or an MoE FFN (router [D, E*G], E*G experts of
width F/G, shared experts of width F/G each), 3 matrices for SwiGLU and 2 for GeLU; a final
RMSNorm [D]; the embedding [V, D] and, untied, a head [D, V]. No biases.

"Embedding" parameters are the input table and the untied head (Kaplan et al. 2020, arXiv:2001.08361,
count non-embedding parameters N). "Active" parameters are those one token multiplies: the router,
top K*G routed experts and the shared experts, instead of all experts.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from moejax.config import validate_model
from moejax.errors import ConfigError
from moejax.moe import is_moe_layer, moe_dims
from moejax.moe.experts import num_ffn_matrices
from moejax.moe.layer import VARIANT_DEFAULTS

@dataclasses.dataclass(frozen=True)
class ParamCounts:
  """Parameter counts of a moejax model (see the module docstring for what each includes)."""
  total: int
  active: int
  embedding: int                 # input table + untied head
  breakdown: dict                # total parameters per component

  @property
  def total_non_embedding(self) -> int:
    return self.total - self.embedding

  @property
  def active_non_embedding(self) -> int:
    return self.active - self.embedding


@dataclasses.dataclass(frozen=True)
class FlopCounts:
  """Training FLOPs per token: `six_n` = 6 x active non-embedding parameters (Kaplan et al. 2020,
  arXiv:2001.08361, C = 6N); `six_n_with_embeddings` = 6 x all active parameters (the N of
  Hoffmann et al. 2022, arXiv:2203.15556); `exact` = 3 x the forward matmul FLOPs in `forward`
  (backward = 2 x forward)."""
  six_n: float
  six_n_with_embeddings: float
  exact: float
  forward: dict                  # forward FLOPs per token per component
  seq_len: int
  causal: bool


def _model(config) -> ml_collections.ConfigDict:
  return config.model if "model" in config else config


# Model options whose parameters the formulas here do not count (the Hugging Face families'
# attention variants, the gated shared expert, routers without the linear gate [D, E]): a config
# that sets one is refused rather than miscounted. (field, value the formulas assume)
_COUNTED_AS = (("qkv_bias", False), ("qk_norm", ""), ("attention", "mha"),
               ("dense_d_ff", 0), ("moe.shared_expert_gate", False),
               # The expert variants (moejax.moe.variants and the sparse layer's options).
               ("moe.layer", "sparse"),
               *((f"moe.{field}", default) for field, default in VARIANT_DEFAULTS.items()))
_LINEAR_GATE_ROUTERS = ("topk", "sigmoid", "switch", "deepseek", "expert_choice", "base",
                        "top_p", "relu")


def _check_counted(m) -> None:
  for field, assumed in _COUNTED_AS:
    node = m
    for part in field.split("."):
      node = node.get(part, assumed) if hasattr(node, "get") else assumed
    if (tuple(node) if isinstance(node, list) else node) != assumed:
      raise ConfigError(f"model.{field}", node, f"{assumed!r}: moejax.scaling.accounting counts "
                        "the plain model only")
  capacity = m.get("mod_capacity", 0.0) if hasattr(m, "get") else 0.0
  if 0 < capacity < 1:
    raise ConfigError("model.mod_capacity", capacity, "0 or 1 (no Mixture-of-Depths): "
                      "moejax.scaling.accounting counts the plain model only")
  if m.moe.router not in _LINEAR_GATE_ROUTERS:
    raise ConfigError("model.moe.router", m.moe.router,
                      f"one of {_LINEAR_GATE_ROUTERS} (a linear gate [D, E], what "
                      "moejax.scaling.accounting counts)")


def _sizes(config) -> dict:
  """Sizes from a full config or its `model` subtree, checked by `validate_model`."""
  m = validate_model(_model(config))
  _check_counted(m)
  dims = moe_dims(m)
  num_moe = sum(is_moe_layer(m, i) for i in range(m.num_layers))
  return {"vocab_size": m.vocab_size, "d_model": m.d_model, "num_layers": m.num_layers,
          "num_heads": m.num_heads, "num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim,
          "d_ff": m.d_ff, "tie": bool(m.tie_embeddings), "dims": dims,
          "mats": num_ffn_matrices(m.moe.expert_type), "num_moe": num_moe,
          "num_dense": m.num_layers - num_moe}


def param_counts(config) -> ParamCounts:
  """Total, active and embedding parameters of the moejax model built from `config` (a full
  config or its `model` subtree). Granularity and shared experts follow "Scaling Laws for
  Fine-Grained Mixture of Experts" (Krajewski et al. 2024, arXiv:2402.07871) and DeepSeekMoE
  (Dai et al. 2024, arXiv:2401.06066); grouped-query attention "GQA" (Ainslie et al. 2023,
  arXiv:2305.13245)."""
  s = _sizes(config)
  d, dims = s["d_model"], s["dims"]
  expert = s["mats"] * d * dims.expert_width
  per_attn = d * s["head_dim"] * (2 * s["num_heads"] + 2 * s["num_kv_heads"])
  b = {
      "attention": s["num_layers"] * per_attn,
      "norms": (2 * s["num_layers"] + 1) * d,
      "dense_ffn": s["num_dense"] * s["mats"] * d * s["d_ff"],
      "router": s["num_moe"] * d * dims.experts,
      "experts": s["num_moe"] * dims.experts * expert,
      "shared_experts": s["num_moe"] * s["mats"] * d * dims.shared_width,
      "embedding": s["vocab_size"] * d,
      "head": 0 if s["tie"] else d * s["vocab_size"],
  }
  total = sum(b.values())
  active = total - b["experts"] + s["num_moe"] * dims.experts_per_token * expert
  return ParamCounts(total=total, active=active, embedding=b["embedding"] + b["head"], breakdown=b)


def flops_per_token(config, seq_len: int | None = None, causal: bool = False) -> FlopCounts:
  """Training FLOPs per token of the moejax model built from `config`.

  The exact count takes every matmul a token goes through, forward: QKV and output projections,
  attention scores QK^T and the weighted sum over values (2 * S * H * Dh each over a context of
  S = `seq_len`, halved when `causal`, which averages the causal mask), router, the K*G routed
  experts, shared experts, dense FFNs and the LM head; it leaves out norms, softmax, activations
  and the embedding lookup. Training = 3 x forward. With causal=False this is the count of
  Hoffmann et al. (2022), arXiv:2203.15556, Appendix F (less its softmax and embedding terms);
  with causal=True the attention term is the 2 n_layer n_ctx d_attn of Kaplan et al. (2020),
  arXiv:2001.08361, Table 1.

  seq_len defaults to config.train.seq_len, else config.model.max_len.
  """
  s = _sizes(config)
  if seq_len is None:
    if "train" in config and "seq_len" in config.train:
      seq_len = config.train.seq_len
    else:
      seq_len = _model(config).max_len
  if not (isinstance(seq_len, int) and seq_len >= 1):
    raise ValueError(f"seq_len = {seq_len!r} is not allowed: expected an integer >= 1")
  counts = param_counts(config)
  d, dims, layers = s["d_model"], s["dims"], s["num_layers"]
  heads_dim = s["num_heads"] * s["head_dim"]
  context = seq_len / 2 if causal else seq_len
  expert = s["mats"] * d * dims.expert_width
  fwd = {
      "qkv_proj": 2 * layers * d * s["head_dim"] * (s["num_heads"] + 2 * s["num_kv_heads"]),
      "out_proj": 2 * layers * heads_dim * d,
      "attn_scores": 2 * layers * context * heads_dim,
      "attn_values": 2 * layers * context * heads_dim,
      "router": 2 * s["num_moe"] * d * dims.experts,
      "experts": 2 * s["num_moe"] * dims.experts_per_token * expert,
      "shared_experts": 2 * s["num_moe"] * s["mats"] * d * dims.shared_width,
      "dense_ffn": 2 * s["num_dense"] * s["mats"] * d * s["d_ff"],
      "lm_head": 2 * d * s["vocab_size"],
  }
  return FlopCounts(six_n=6.0 * counts.active_non_embedding,
                    six_n_with_embeddings=6.0 * counts.active,
                    exact=3.0 * float(sum(fwd.values())), forward=fwd, seq_len=seq_len,
                    causal=causal)
