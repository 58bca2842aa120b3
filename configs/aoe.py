"""Autonomy-of-Experts: no router; each expert's gate projection is factorised A [D, r] B [r, F]
and the top-2 experts by ||x A|| compute the token ("Autonomy-of-Experts Models", Lv et al.
2025, arXiv:2501.13074). Rank r = 16 = d_model / 4; experts as wide as the default's (d_ff 128),
so AoE has slightly fewer parameters (no router, and D r + r F < D F per expert)."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import default  # noqa: E402


def get_config():
  c = default.get_config()
  moe = c.model.moe
  moe.layer = "aoe"
  moe.aoe_rank = 16
  moe.dispatch = "dropless"
  return c
