"""Reproduces the unified routed scaling law of Clark et al. (2022), "Unified Scaling Laws for
Routed Language Models", arXiv:2202.01169, Eq. (1), fitted per router (S-Base, RL-R, Hash) on
the final-step validation losses (least squares on log loss), next to the paper's Table 3.

Run: python experiments/scaling/reproduce_clark.py
"""
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from moejax.scaling import fit, get_law  # noqa: E402
from moejax.scaling.published import CLARK_ROUTERS, clark_final_points  # noqa: E402


def rmse_log10(law, params, data):
  pred = law.loss(params, N=data["N"], E=data["E"])
  return float(np.sqrt(np.mean((np.log10(pred) - np.log10(data["loss"])) ** 2)))


def main():
  law = get_law("clark")
  out = {}
  names = law.param_names
  print(f"{'router':>7} {'':>9} " + " ".join(f"{k:>9}" for k in names) + "  RMSE(log10 L)  points")
  for router in CLARK_ROUTERS:
    data = clark_final_points(router)
    r = fit(law, data, loss="squares", max_iter=100)
    paper = law.published_by_router[router]
    ours = r.rmse_log / math.log(10)
    for label, params, rmse in (("fitted", r.params, ours),
                                ("Table 3", paper, rmse_log10(law, paper, data))):
      print(f"{router:>7} {label:>9} " + " ".join(f"{params[k]:>9.4g}" for k in names)
            + f"  {rmse:>13.5f}  {len(data['loss'])}")
    out[router] = {"fitted": r.params, "rmse_log10": ours,
                   "paper_rmse_log10_on_this_data": rmse_log10(law, paper, data)}
  print("(Table 3 rows: the paper's coefficients evaluated on these points.)")
  print(json.dumps(out))


if __name__ == "__main__":
  main()
