"""RMoE: the layerwise recurrent router ("Layerwise Recurrent Router for Mixture-of-Experts",
Qiu et al. 2024, arXiv:2408.06793). A GRU with a 32-wide state carries each token's routing
state from MoE layer to MoE layer; softmax top-2 of 8 experts as the default config."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import default  # noqa: E402


def get_config():
  c = default.get_config()
  moe = c.model.moe
  moe.router = "rmoe"
  moe.router_args.hidden_size = 32
  return c
