"""Fine-grained MoE: granularity 8 with one shared expert.

8 experts split 8 ways give 64 experts of width d_ff/8, each token routed to top 1*8 = 8 of them
("Scaling Laws for Fine-Grained Mixture of Experts", Krajewski et al. 2024, arXiv:2402.07871),
plus an always-on shared expert of the same width (DeepSeekMoE, Dai et al. 2024,
arXiv:2401.06066).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import default  # noqa: E402


def get_config():
  c = default.get_config()
  moe = c.model.moe
  moe.num_experts = 8
  moe.top_k = 1
  moe.granularity = 8
  moe.num_shared_experts = 1
  moe.dispatch = "dropless"
  return c
