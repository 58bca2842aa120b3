"""ReXMoE: each router chooses among its own 8 experts and those of the MoE layers next to it
("ReXMoE: Reusing Experts with Minimal Overhead in Mixture-of-Experts", Tan et al. 2025,
arXiv:2510.17483). reuse_range 1: pools of 3 layers' experts (24), top-2; the expert parameters
are the default model's, only the routers are 3x wider."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import default  # noqa: E402


def get_config():
  c = default.get_config()
  moe = c.model.moe
  moe.layer = "rexmoe"
  moe.reuse_range = 1
  return c
