"""Mixture-of-Depths ("Mixture-of-Depths: Dynamically allocating compute in transformer-based
language models", Raposo et al. 2024, arXiv:2404.02258): every other block (1 and 3) processes
only the top 12.5% of each sequence's tokens by a learned router score and the rest skip it on
the residual stream; the FFNs stay the default's 8-expert top-2 MoE (a routed block's MoE layer
sees the chosen tokens only). The router also learns to predict its own top-k choice (the
paper's auxiliary loss of sec. 3.5, weight 0.01). moejax.moe.depth has the equations.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import default  # noqa: E402


def get_config():
  c = default.get_config()
  m = c.model
  m.mod_capacity = 0.125       # k = round(0.125 * S) tokens of each sequence per routed block
  m.mod_every = 2              # blocks 1, 3, ... route (0-based); the others are full
  m.mod_aux_loss_weight = 0.01  # BCE(sigmoid(r), top-k choice): the causal predictor
  return c
