"""DeepSeek-V3 ("DeepSeek-V3 Technical Report", arXiv:2412.19437): multi-head latent attention
("DeepSeek-V2", arXiv:2405.04434, sec. 2.1), the first `first_k_dense_replace` layers dense,
then MoE layers of fine-grained SwiGLU experts with shared experts and a sigmoid router that
selects on scores plus a per-expert correction bias within the best `topk_group` of `n_group`
expert groups, weights the unbiased scores (renormalised) and scales them by
`routed_scaling_factor` (router `deepseek`)."""
from __future__ import annotations

from moejax.interop.hf import tables as t

MODEL_TYPE, ARCHITECTURE = "deepseek_v3", "DeepseekV3ForCausalLM"
ROUTER = "deepseek"
# The moejax router's per-expert selection bias (a RouterState, not trained by the optimizer).
BIAS = "bias"
# DeepSeek-V3's bias update speed gamma (sec. 2.1.2), used when training continues.
BIAS_UPDATE_RATE = 0.001


def to_moejax(hf: dict) -> dict:
  """config.json -> moejax fields (dotted names) of DeepSeek-V3 (arXiv:2412.19437)."""
  from moejax.moe import ROUTERS  # noqa: PLC0415
  t.refuse_unless(hf, "topk_method", lambda v: v in (None, "noaux_tc"),
                  "'noaux_tc' (DeepSeek-V3's bias-corrected group-limited top-k)")
  t.refuse_unless(hf, "scoring_func", lambda v: v in (None, "sigmoid"), "'sigmoid'")
  t.refuse_unless(hf, "moe_layer_freq", lambda v: v in (None, 1),
                  "1 (transformers ignores it: every layer after the dense ones is MoE)")
  t.refuse_unless(hf, "n_routed_experts", lambda v: v % hf.get("n_group", 1) == 0,
                  f"a multiple of n_group={hf.get('n_group')}")
  common = t.common_config(hf)
  if ROUTER not in ROUTERS:
    raise t.UnsupportedCheckpoint("model_type", MODEL_TYPE, "a family whose router moejax has: "
                                  f"router {ROUTER!r} is not registered yet (router zoo)")
  nope, rope = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"]
  return {**common,
          "model.head_dim": nope + rope,
          "model.num_kv_heads": hf["num_attention_heads"],   # MLA: every head its own k, v
          "model.attention": "mla",
          "model.mla.q_lora_rank": hf.get("q_lora_rank") or 0,
          "model.mla.kv_lora_rank": hf["kv_lora_rank"],
          "model.mla.rope_head_dim": rope,
          "model.mla.v_head_dim": hf["v_head_dim"],
          "model.d_ff": hf["moe_intermediate_size"],
          "model.dense_d_ff": hf["intermediate_size"],
          "model.moe_every": 1,
          "model.first_dense_layers": hf.get("first_k_dense_replace", 0),
          "model.moe.num_experts": hf["n_routed_experts"],
          "model.moe.top_k": hf["num_experts_per_tok"],
          "model.moe.num_shared_experts": hf.get("n_shared_experts") or 0,
          "model.moe.router": ROUTER,
          "model.moe.bias_update_rate": BIAS_UPDATE_RATE,
          "model.moe.router_args.num_groups": hf.get("n_group", 1),
          "model.moe.router_args.topk_groups": hf.get("topk_group", 1),
          "model.moe.router_args.routed_scaling": float(hf.get("routed_scaling_factor", 1.0)),
          "model.moe.router_args.renormalize": bool(hf.get("norm_topk_prob", True))}


def to_hf(m) -> dict:
  """moejax `model` subtree -> DeepSeek-V3 config.json (arXiv:2412.19437). Written with
  `rope_interleave` false: moejax pairs RoPE halves, and so does transformers then."""
  la, args = m.mla, m.moe.router_args
  return {**t.common_config_json(m, MODEL_TYPE, ARCHITECTURE),
          "head_dim": la.rope_head_dim,
          "qk_nope_head_dim": m.head_dim - la.rope_head_dim,
          "qk_rope_head_dim": la.rope_head_dim,
          "qk_head_dim": m.head_dim,
          "v_head_dim": la.v_head_dim,
          "q_lora_rank": la.q_lora_rank or None,
          "kv_lora_rank": la.kv_lora_rank,
          "rope_interleave": False,
          "intermediate_size": m.dense_d_ff or m.d_ff,
          "moe_intermediate_size": m.d_ff,
          "first_k_dense_replace": m.first_dense_layers,
          "n_routed_experts": m.moe.num_experts,
          "num_experts_per_tok": m.moe.top_k,
          "n_shared_experts": m.moe.num_shared_experts,
          "n_group": args.get("num_groups", 1),
          "topk_group": args.get("topk_groups", 1),
          "routed_scaling_factor": float(args.get("routed_scaling", 1.0)),
          "norm_topk_prob": bool(args.get("renormalize", True)),
          "num_key_value_heads": m.num_heads,
          "attention_bias": False}


def check_model(m) -> None:
  """Refuses moejax models DeepSeek-V3 cannot express (arXiv:2412.19437)."""
  t.check_exportable(m, MODEL_TYPE, {
      "moe.router": (ROUTER,), "attention": ("mla",), "moe_every": (1,),
      "dense_layers": ((),), "moe.shared_expert_gate": (False,)})
  if not m.moe.num_shared_experts:
    raise t.ConfigError("model.moe.num_shared_experts", 0, ">= 1 to export as deepseek_v3")


def table(m, hf: dict | None = None) -> list[t.Tensor]:
  """Checkpoint name -> moejax parameter of DeepSeek-V3 (arXiv:2412.19437). Interleaved RoPE
  pairs (`rope_interleave`, the released checkpoints) are permuted to halves on the q and k
  RoPE columns."""
  from moejax.moe import is_moe_layer  # noqa: PLC0415
  r = m.mla.rope_head_dim if (hf or {}).get("rope_interleave", True) else 0
  rope_linear = t.Transform("linear", deinterleave=r)
  out = t.embeddings_table()
  for i in range(m.num_layers):
    hf_attn, mj = f"model.layers.{i}.self_attn.", ("blocks", i, "attn")
    out += [t.Tensor(f"model.layers.{i}.input_layernorm.weight", ("blocks", i, "attn_norm", "scale")),
            t.Tensor(f"model.layers.{i}.post_attention_layernorm.weight",
                     ("blocks", i, "ffn_norm", "scale"))]
    if m.mla.q_lora_rank:
      out += [t.Tensor(hf_attn + "q_a_proj.weight", mj + ("wq_a",), t.LINEAR),
              t.Tensor(hf_attn + "q_a_layernorm.weight", mj + ("q_norm", "scale")),
              t.Tensor(hf_attn + "q_b_proj.weight", mj + ("wq_b",), rope_linear)]
    else:
      out.append(t.Tensor(hf_attn + "q_proj.weight", mj + ("wq",), rope_linear))
    out += [t.Tensor(hf_attn + "kv_a_proj_with_mqa.weight", mj + ("wkv_a",), rope_linear),
            t.Tensor(hf_attn + "kv_a_layernorm.weight", mj + ("kv_norm", "scale")),
            t.Tensor(hf_attn + "kv_b_proj.weight", mj + ("wkv_b",), t.LINEAR),
            t.Tensor(hf_attn + "o_proj.weight", mj + ("wo",), t.LINEAR_OUT)]
    hf_mlp, ffn = f"model.layers.{i}.mlp.", ("blocks", i, "ffn")
    if not is_moe_layer(m, i):
      out += t.mlp_table(hf_mlp, ffn)
      continue
    out += [t.Tensor(hf_mlp + "gate.weight", ffn + ("router", "gate"), t.LINEAR),
            t.Tensor(hf_mlp + "gate.e_score_correction_bias", ffn + ("router", BIAS))]
    out += t.experts_table(hf_mlp + "experts.", ffn, m.moe.num_experts)
    out += t.mlp_table(hf_mlp + "shared_experts.", ffn + ("shared",))
  return out
