"""MoE++: 8 FFN experts plus zero, copy and two constant experts, top-2, with gating residuals
("MoE++: Accelerating Mixture-of-Experts Methods with Zero-Computation Experts", Jin et al.
2024, arXiv:2410.07348).

The four zero-computation experts are resolved outside the grouped matmul
(moejax.moe.extra_experts); the router of each MoE layer after the first adds the previous
layer's logits through a learned map W_g (moejax.moe.routing.base.gating_residual). The
heterogeneous load-balancing loss weighs the zero-computation experts by tau.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import default  # noqa: E402


def get_config():
  c = default.get_config()
  moe = c.model.moe
  moe.num_experts = 8
  moe.top_k = 2
  moe.extra_experts = ("zero", "copy", "constant", "constant")
  moe.gating_residual = True
  # tau < 1 charges the zero-computation experts less in the balance loss, so more tokens
  # take them (0.75: our pick, not a value checked against the paper).
  moe.zero_compute_lb_weight = 0.75
  return c
