"""HMoE: 8 experts of hidden widths 32..224 (together the parameters of 8 experts of width 128),
top-2, with the parameter penalty in place of the load-balancing loss ("HMoE: Heterogeneous
Mixture of Experts for Language Modeling", Wang et al. 2024, arXiv:2408.10681).

The bank is stored at the widest width with a fixed mask (moejax.moe.heterogeneous): every
copy costs the FLOPs of a width-224 expert. The P-Penalty is the Switch loss with each expert's
term scaled by its width over the mean width, so it replaces the Switch loss (equal widths give
that loss exactly) and steers tokens towards the small experts.
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
  moe.expert_widths = (32, 64, 96, 128, 128, 160, 192, 224)
  moe.lb_loss_weight = 0.0
  moe.param_penalty_weight = 0.01
  return c
