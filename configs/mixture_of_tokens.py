"""Mixture of Tokens ("Mixture of Tokens: Continuous MoE through Cross-Example Aggregation",
Antoniak et al. 2023, arXiv:2310.15961): each of the 8 experts processes a softmax-weighted
mixture of the tokens at one position of a group of 4 sequences and hands its output back
with the same weights.

Causal, but batch-dependent: a token's output depends on the 3 other sequences of its group
(moejax.moe.variants.tokens). 8 experts per group of 4 tokens is 2 expert FFNs per token, the
compute of the default top-2 layer.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import default  # noqa: E402


def get_config():
  c = default.get_config()
  moe = c.model.moe
  moe.layer = "mot"
  moe.mot_group_size = 4   # E / n = 8 / 4 = 2 expert FFNs per token
  return c
