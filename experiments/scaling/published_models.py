"""Configs of published MoE models, as moejax ConfigDicts, for checking the accounting.

- Mixtral 8x7B: "Mixtral of Experts", Jiang et al. 2024, arXiv:2401.04088 (46.7B total, 12.9B
  active parameters): 32 layers, d_model 4096, 32 heads of 128, 8 KV heads, SwiGLU experts of
  width 14336, 8 experts top-2, vocab 32000, untied head.
- OLMoE-1B-7B: "OLMoE: Open Mixture-of-Experts Language Models", Muennighoff et al. 2024,
  arXiv:2409.02060 (6.9B total, 1.3B active): 16 layers, d_model 2048, 16 heads of 128, SwiGLU
  experts of width 1024, 64 experts top-8, vocab 50304, untied head. (OLMoE's QK-norm scales,
  4096 per layer, are not part of moejax's model and are left out.)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from configs import default  # noqa: E402


def _moe(vocab, d_model, layers, heads, kv_heads, head_dim, d_ff, experts, top_k):
  c = default.get_config()
  m = c.model
  m.vocab_size, m.d_model, m.num_layers = vocab, d_model, layers
  m.num_heads, m.num_kv_heads, m.head_dim, m.d_ff = heads, kv_heads, head_dim, d_ff
  m.moe_every, m.tie_embeddings = 1, False
  m.moe.num_experts, m.moe.top_k, m.moe.granularity = experts, top_k, 1
  m.moe.num_shared_experts, m.moe.expert_type = 0, "swiglu"
  return c


def mixtral_8x7b():
  """Mixtral 8x7B (arXiv:2401.04088) as a moejax config."""
  return _moe(32000, 4096, 32, 32, 8, 128, 14336, 8, 2)


def olmoe_1b_7b():
  """OLMoE-1B-7B (arXiv:2409.02060) as a moejax config."""
  return _moe(50304, 2048, 16, 16, 16, 128, 1024, 64, 8)


if __name__ == "__main__":
  from moejax.scaling.accounting import flops_per_token, param_counts
  for name, cfg in (("Mixtral 8x7B", mixtral_8x7b()), ("OLMoE-1B-7B", olmoe_1b_7b())):
    p, f = param_counts(cfg), flops_per_token(cfg, seq_len=4096)
    print(f"{name}: total {p.total / 1e9:.2f}B, active {p.active / 1e9:.2f}B, "
          f"non-embedding total {p.total_non_embedding / 1e9:.2f}B, active "
          f"{p.active_non_embedding / 1e9:.2f}B; training FLOPs/token at S=4096: "
          f"6N {f.six_n / 1e9:.1f} GFLOP, exact {f.exact / 1e9:.1f} GFLOP")
