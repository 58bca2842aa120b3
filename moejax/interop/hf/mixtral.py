"""Mixtral ("Mixtral of Experts", Jiang et al. 2024, arXiv:2401.04088): Llama-style GQA attention,
every layer an MoE of SwiGLU experts, top-2 of a softmax router renormalised over the two."""
from __future__ import annotations

from moejax.interop.hf import tables as t

MODEL_TYPE, ARCHITECTURE = "mixtral", "MixtralForCausalLM"


def to_moejax(hf: dict) -> dict:
  """config.json -> moejax fields (dotted names) of Mixtral (arXiv:2401.04088)."""
  t.refuse_unless(hf, "router_jitter_noise", lambda v: not v,
                  "0 (moejax's top-k router has no input jitter; router 'switch' has)")
  return {**t.common_config(hf),
          "model.d_ff": hf["intermediate_size"],
          "model.moe_every": 1,
          "model.moe.num_experts": hf["num_local_experts"],
          "model.moe.top_k": hf["num_experts_per_tok"],
          "model.moe.router": "topk",
          "model.moe.router_args.softmax_order": "before",
          "model.moe.router_args.renormalize": True}


def to_hf(m) -> dict:
  """moejax `model` subtree -> Mixtral config.json (arXiv:2401.04088)."""
  return {**t.common_config_json(m, MODEL_TYPE, ARCHITECTURE),
          "intermediate_size": m.d_ff,
          "num_local_experts": m.moe.num_experts,
          "num_experts_per_tok": m.moe.top_k,
          "sliding_window": None,
          "router_jitter_noise": 0.0}


def check_model(m) -> None:
  """Refuses moejax models Mixtral cannot express (arXiv:2401.04088)."""
  after = t._field(m, "moe.router_args.softmax_order") == "after"   # = before + renormalize
  t.check_exportable(m, MODEL_TYPE, {
      "moe.router": ("topk",), "moe.router_args.softmax_order": ("before", "after"),
      "moe.router_args.renormalize": (True, False) if after else (True,), "moe_every": (1,), "attention": ("mha",),
      "qkv_bias": (False,), "qk_norm": ("",), "moe.num_shared_experts": (0,),
      "first_dense_layers": (0,), "dense_layers": ((),), "moe.bias_update_rate": (0, 0.0)})


def table(m, hf: dict | None = None) -> list[t.Tensor]:
  """Checkpoint name -> moejax parameter of Mixtral (arXiv:2401.04088)."""
  out = t.embeddings_table()
  for i in range(m.num_layers):
    hf, mj = f"model.layers.{i}.block_sparse_moe.", ("blocks", i, "ffn")
    out += t.attention_table(i)
    out.append(t.Tensor(hf + "gate.weight", mj + ("router", "gate"), t.LINEAR))
    out += t.experts_table(hf + "experts.", mj, m.moe.num_experts, names=("w1", "w3", "w2"))
  return out
