"""Qwen2-MoE ("Qwen2 Technical Report", Yang et al. 2024, arXiv:2407.10671; Qwen1.5-MoE): GQA
attention with q/k/v biases, MoE layers every `decoder_sparse_step` (but `mlp_only_layers`) of
fine-grained SwiGLU experts under a softmax top-k router (`norm_topk_prob`), plus one shared
expert scaled by a sigmoid gate."""
from __future__ import annotations

from moejax.interop.hf import tables as t

MODEL_TYPE, ARCHITECTURE = "qwen2_moe", "Qwen2MoeForCausalLM"


def moe_config(hf: dict) -> dict:
  """The MoE fields Qwen2-MoE and Qwen3-MoE share (arXiv:2407.10671): sparse step, dense layers,
  softmax top-k with optional renormalisation, expert width."""
  num_experts = hf.get("num_experts") or hf.get("num_local_experts")
  return {"model.d_ff": hf["moe_intermediate_size"],
          "model.dense_d_ff": hf["intermediate_size"],
          "model.moe_every": hf.get("decoder_sparse_step", 1),
          "model.dense_layers": tuple(hf.get("mlp_only_layers") or ()),
          "model.moe.num_experts": num_experts,
          "model.moe.top_k": hf["num_experts_per_tok"],
          "model.moe.router": "topk",
          "model.moe.router_args.softmax_order": "before",
          "model.moe.router_args.renormalize": bool(hf.get("norm_topk_prob", False))}


def moe_config_json(m) -> dict:
  """The MoE config.json fields of Qwen2-MoE and Qwen3-MoE (arXiv:2407.10671)."""
  return {"moe_intermediate_size": m.d_ff,
          "intermediate_size": m.dense_d_ff or m.d_ff,
          "decoder_sparse_step": m.moe_every,
          "mlp_only_layers": list(m.dense_layers),
          "num_experts": m.moe.num_experts,
          "num_experts_per_tok": m.moe.top_k,
          "norm_topk_prob": bool(m.moe.router_args.get("renormalize", False)),
          "use_sliding_window": False,
          "sliding_window": None}


def to_moejax(hf: dict) -> dict:
  """config.json -> moejax fields (dotted names) of Qwen2-MoE (arXiv:2407.10671)."""
  shared, width = hf.get("shared_expert_intermediate_size", 0), hf["moe_intermediate_size"]
  t.refuse_unless(hf, "shared_expert_intermediate_size", lambda v: v and v % width == 0,
                  f"a positive multiple of moe_intermediate_size={width} (moejax's shared "
                  "experts are whole experts of the routed width)")
  return {**t.common_config(hf), **moe_config(hf),
          "model.qkv_bias": bool(hf.get("qkv_bias", True)),
          "model.moe.num_shared_experts": shared // width,
          "model.moe.shared_expert_gate": True}


def to_hf(m) -> dict:
  """moejax `model` subtree -> Qwen2-MoE config.json (arXiv:2407.10671)."""
  return {**t.common_config_json(m, MODEL_TYPE, ARCHITECTURE), **moe_config_json(m),
          "qkv_bias": bool(m.qkv_bias),
          "shared_expert_intermediate_size": m.moe.num_shared_experts * m.d_ff}


def check_model(m) -> None:
  """Refuses moejax models Qwen2-MoE cannot express (arXiv:2407.10671)."""
  t.check_exportable(m, MODEL_TYPE, {
      "moe.router": ("topk",), "moe.router_args.softmax_order": ("before",),
      "attention": ("mha",), "qk_norm": ("",), "moe.shared_expert_gate": (True,),
      "first_dense_layers": (0,), "moe.bias_update_rate": (0, 0.0)})
  if not m.moe.num_shared_experts:
    raise t.ConfigError("model.moe.num_shared_experts", 0, ">= 1 to export as qwen2_moe")


def dense_or_moe_table(m, i: int, shared: bool) -> list[t.Tensor]:
  """Layer i's FFN, Qwen-MoE names (arXiv:2407.10671): a dense `mlp` or router, experts and
  (optionally) the gated shared expert."""
  from moejax.moe import is_moe_layer  # noqa: PLC0415
  hf, mj = f"model.layers.{i}.mlp.", ("blocks", i, "ffn")
  if not is_moe_layer(m, i):
    return t.mlp_table(hf, mj)
  out = [t.Tensor(hf + "gate.weight", mj + ("router", "gate"), t.LINEAR)]
  out += t.experts_table(hf + "experts.", mj, m.moe.num_experts)
  if shared:
    out += t.mlp_table(hf + "shared_expert.", mj + ("shared",))
    out.append(t.Tensor(hf + "shared_expert_gate.weight", mj + ("shared", "gate"), t.ROW))
  return out


def table(m, hf: dict | None = None) -> list[t.Tensor]:
  """Checkpoint name -> moejax parameter of Qwen2-MoE (arXiv:2407.10671)."""
  out = t.embeddings_table()
  for i in range(m.num_layers):
    out += t.attention_table(i, bias=m.qkv_bias)
    out += dense_or_moe_table(m, i, shared=True)
  return out
