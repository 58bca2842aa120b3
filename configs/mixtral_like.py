"""Mixtral-like: 8 experts, top-2, softmax over the chosen two, dropless (Jiang et al. 2024,
"Mixtral of Experts", arXiv:2401.04088)."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import default  # noqa: E402


def get_config():
  c = default.get_config()
  moe = c.model.moe
  moe.num_experts = 8
  moe.top_k = 2
  moe.router = "topk"
  moe.router_args.softmax_order = "after"
  moe.dispatch = "dropless"
  return c
