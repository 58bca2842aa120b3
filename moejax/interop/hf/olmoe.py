"""OLMoE ("OLMoE: Open Mixture-of-Experts Language Models", Muennighoff et al. 2024,
arXiv:2409.02060): every layer an MoE of 64 fine-grained SwiGLU experts, softmax top-8 without
renormalisation, and RMS qk-norm over the whole q and k projections (all heads at once;
"Scaling Vision Transformers to 22 Billion Parameters", arXiv:2302.05442)."""
from __future__ import annotations

from moejax.interop.hf import tables as t

MODEL_TYPE, ARCHITECTURE = "olmoe", "OlmoeForCausalLM"


def to_moejax(hf: dict) -> dict:
  """config.json -> moejax fields (dotted names) of OLMoE (arXiv:2409.02060)."""
  t.refuse_unless(hf, "clip_qkv", lambda v: v is None, "null (moejax does not clip q, k, v)")
  d, h = hf["hidden_size"], hf["num_attention_heads"]
  t.refuse_unless(hf, "head_dim", lambda v: v in (None, d // h),
                  f"hidden_size / num_attention_heads = {d // h} (OLMoE's k-norm width assumes it)")
  return {**t.common_config(hf),
          "model.d_ff": hf["intermediate_size"],
          "model.moe_every": 1,
          "model.qk_norm": "full",
          "model.moe.num_experts": hf["num_experts"],
          "model.moe.top_k": hf["num_experts_per_tok"],
          "model.moe.router": "topk",
          "model.moe.router_args.softmax_order": "before",
          "model.moe.router_args.renormalize": bool(hf.get("norm_topk_prob", False))}


def to_hf(m) -> dict:
  """moejax `model` subtree -> OLMoE config.json (arXiv:2409.02060)."""
  out = {**t.common_config_json(m, MODEL_TYPE, ARCHITECTURE),
         "intermediate_size": m.d_ff,
         "num_experts": m.moe.num_experts,
         "num_experts_per_tok": m.moe.top_k,
         "norm_topk_prob": bool(m.moe.router_args.get("renormalize", False)),
         "clip_qkv": None, "attention_bias": False}
  del out["head_dim"]   # OLMoE derives it
  return out


def check_model(m) -> None:
  """Refuses moejax models OLMoE cannot express (arXiv:2409.02060)."""
  t.check_exportable(m, MODEL_TYPE, {
      "moe.router": ("topk",), "moe.router_args.softmax_order": ("before",),
      "moe_every": (1,), "attention": ("mha",), "qkv_bias": (False,), "qk_norm": ("full",),
      "moe.num_shared_experts": (0,), "first_dense_layers": (0,), "dense_layers": ((),),
      "moe.bias_update_rate": (0, 0.0), "head_dim": (m.d_model // m.num_heads,)})


def table(m, hf: dict | None = None) -> list[t.Tensor]:
  """Checkpoint name -> moejax parameter of OLMoE (arXiv:2409.02060)."""
  out = t.embeddings_table()
  for i in range(m.num_layers):
    hf, mj = f"model.layers.{i}.mlp.", ("blocks", i, "ffn")
    out += t.attention_table(i, qk_norm=True)
    out.append(t.Tensor(hf + "gate.weight", mj + ("router", "gate"), t.LINEAR))
    out += t.experts_table(hf + "experts.", mj, m.moe.num_experts)
  return out
