"""Dense baseline with the same active FLOPs per token as configs/default.py.

The default routes each token to top_k=2 experts of width d_ff; here every layer has one dense
SwiGLU FFN of width 2*d_ff, so the FFN FLOPs per token match (the comparison of Switch
Transformer, Fedus et al. 2021, arXiv:2101.03961, sec. 3).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import default  # noqa: E402


def get_config():
  c = default.get_config()
  c.model.d_ff = c.model.moe.top_k * c.model.d_ff
  c.model.moe_every = 0
  return c
