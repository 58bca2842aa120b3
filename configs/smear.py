"""SMEAR ("Soft Merging of Experts with Adaptive Routing", Muqeeth et al. 2023,
arXiv:2306.03745): the router's probabilities average the 8 experts' parameters into one merged
expert, which runs.

`prefix` routing (causal): each token's merged expert comes from the mean of its document up to
it, applied by linearity at the compute of all 8 experts. `smear_routing = "sequence"` is the
paper's per-example merge (one expert FFN per token), which is not causal in an LM
(moejax.moe.variants.smear).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import default  # noqa: E402


def get_config():
  c = default.get_config()
  moe = c.model.moe
  moe.layer = "smear"
  moe.smear_routing = "prefix"
  return c
