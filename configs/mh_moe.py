"""MH-MoE ("Multi-Head Mixture-of-Experts", Wu et al. 2024, arXiv:2404.15045): each token is
projected and split into 2 sub-tokens of width 32, each routed top-2 of 8 on its own through
experts of width 128 on 32-wide inputs, then merged back by a second projection.

Causal and batch-independent, as the top-k router is (moejax.moe.variants.multi_head). Expert
FLOPs per token equal the default's; expert parameters are halved; the two D x D projections
add 2 D^2 per layer.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import default  # noqa: E402


def get_config():
  c = default.get_config()
  moe = c.model.moe
  moe.layer = "multi_head"
  moe.mh_heads = 2
  return c
