"""Qwen3-MoE ("Qwen3 Technical Report", Yang et al. 2025, arXiv:2505.09388): Qwen2-MoE's layout
(arXiv:2407.10671) without shared experts or q/k/v biases, with per-head RMS qk-norm ("Scaling
Vision Transformers to 22 Billion Parameters", arXiv:2302.05442) and renormalised top-k."""
from __future__ import annotations

from moejax.interop.hf import qwen2_moe
from moejax.interop.hf import tables as t

MODEL_TYPE, ARCHITECTURE = "qwen3_moe", "Qwen3MoeForCausalLM"


def to_moejax(hf: dict) -> dict:
  """config.json -> moejax fields (dotted names) of Qwen3-MoE (arXiv:2505.09388)."""
  return {**t.common_config(hf), **qwen2_moe.moe_config(hf), "model.qk_norm": "head"}


def to_hf(m) -> dict:
  """moejax `model` subtree -> Qwen3-MoE config.json (arXiv:2505.09388)."""
  return {**t.common_config_json(m, MODEL_TYPE, ARCHITECTURE), **qwen2_moe.moe_config_json(m),
          "attention_bias": False}


def check_model(m) -> None:
  """Refuses moejax models Qwen3-MoE cannot express (arXiv:2505.09388)."""
  t.check_exportable(m, MODEL_TYPE, {
      "moe.router": ("topk",), "moe.router_args.softmax_order": ("before",),
      "attention": ("mha",), "qkv_bias": (False,), "qk_norm": ("head",),
      "moe.num_shared_experts": (0,), "first_dense_layers": (0,),
      "moe.bias_update_rate": (0, 0.0)})


def table(m, hf: dict | None = None) -> list[t.Tensor]:
  """Checkpoint name -> moejax parameter of Qwen3-MoE (arXiv:2505.09388)."""
  out = t.embeddings_table()
  for i in range(m.num_layers):
    out += t.attention_table(i, qk_norm=True)
    out += qwen2_moe.dense_or_moe_table(m, i, shared=False)
  return out
