"""PEER ("Mixture of A Million Experts", He 2024, arXiv:2407.04153): 128^2 = 16,384
single-neuron experts per layer, retrieved by product keys by 8 query heads of 16 experts each
(the paper's heads and top-k). Causal and batch-independent (moejax.moe.variants.peer).

About 2.1M expert parameters per layer against the default's 197K; 128 active neurons of 2 D
weights per token against top-2's 2 x 128 SwiGLU neurons of 3 D.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import default  # noqa: E402


def get_config():
  c = default.get_config()
  moe = c.model.moe
  moe.layer = "peer"
  moe.peer_experts = 128 ** 2
  moe.peer_heads = 8
  moe.peer_top_k = 16
  return c
