"""AdaMoE: top-4 over 8 real and 8 null experts ("AdaMoE: Token-Adaptive Routing with Null
Experts for Mixture-of-Experts Language Models", Zeng et al. 2024, arXiv:2406.13233).

A null expert computes nothing (moejax.moe.extra_experts), so a token uses 0 to 4 real experts.
The load-balancing loss counts the null experts as experts: balanced, half of the 4 slots go to
null experts, 2 real experts per token on average, the active FLOPs of the default top-2.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import default  # noqa: E402


def get_config():
  c = default.get_config()
  moe = c.model.moe
  moe.num_experts = 8
  moe.null_experts = 8
  moe.top_k = 4
  return c
