"""Soft MoE ("From Sparse to Soft Mixtures of Experts", Puigcerver et al. 2023, arXiv:2308.00951):
every expert processes P slots, each a softmax-weighted mixture of all the tokens of a sequence.

NOT CAUSAL: a slot mixes the whole sequence, later tokens included, so this LM's loss leaks the
future and is not comparable with a causal model's (moejax.moe.variants.soft). It is here to
study the layer. P = 16 slots for each of the 8 experts on 64-token sequences is 2 expert FFNs
per token, the compute of the default top-2 layer.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import default  # noqa: E402


def get_config():
  c = default.get_config()
  moe = c.model.moe
  moe.layer = "soft"
  moe.soft_slots_per_expert = 16   # E * P / S = 8 * 16 / 64 = 2 expert FFNs per token
  return c
