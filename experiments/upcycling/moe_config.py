"""The MoE that configs/dense.py upcycles into (experiments/upcycling): configs/default.py's 8
experts, top-2 dropless, each expert as wide as the dense FFN (d_ff 256), and a router whose two
weights are renormalised to sum to 1, so the sparse-upcycled model starts as the dense model's
function (Sparse Upcycling, Komatsuzaki et al. 2022, arXiv:2212.05055)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs"))
import default  # noqa: E402
import dense  # noqa: E402


def get_config():
  c = default.get_config()
  c.model.d_ff = dense.get_config().model.d_ff
  c.model.moe.router_args.renormalize = True
  return c
