"""Switch Transformer: top-1 routing with a capacity factor and jitter noise (Fedus et al. 2021,
arXiv:2101.03961). Capacity C = ceil(1.25 * R / E) per routing group of R = one sequence."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import default  # noqa: E402


def get_config():
  c = default.get_config()
  moe = c.model.moe
  moe.router = "switch"
  moe.top_k = 1
  moe.router_args.jitter_noise = 0.01
  moe.dispatch = "capacity"
  moe.capacity_factor = 1.25
  moe.routing_group = c.train.seq_len
  return c
