"""Chain-of-Experts CoE-2(1/8): two routed iterations of top-1 over one bank of 8 experts, the
expert FLOPs of the default top-2 ("Chain-of-Experts: Unlocking the Communication Power of
Mixture-of-Experts Models", Wang et al. 2025, arXiv:2506.18945).

Each iteration has its own router and adds its output to the iteration's input (the inner
residual); moejax.moe.chain.
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
  moe.chain_iterations = 2
  return c
