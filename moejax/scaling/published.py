"""Published scaling-law data points shipped in experiments/scaling/data (see PROVENANCE.md there).

- `chinchilla_epoch`: the Chinchilla runs as extracted by Besiroglu et al. (2024), "Chinchilla
  Scaling: A replication attempt", arXiv:2404.10102.
- `clark_final_points`: final-step losses of the routed LMs of Clark et al. (2022), "Unified
  Scaling Laws for Routed Language Models", arXiv:2202.01169.
"""
from __future__ import annotations

import os

import numpy as np

from moejax.scaling.tables import read_csv

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "experiments", "scaling", "data")
CLARK_ROUTERS = ("S-Base", "RL-R", "Hash")


def _path(name: str, data_dir: str | None) -> str:
  path = os.path.join(data_dir or DATA_DIR, name)
  if not os.path.exists(path):
    raise FileNotFoundError(f"data file {path!r} is missing: expected the copy shipped in "
                            "experiments/scaling/data (pass data_dir= to read another folder)")
  return path


def chinchilla_epoch(data_dir: str | None = None, drop_highest: int = 5) -> dict[str, np.ndarray]:
  """{N, D, C, loss} [240] of Besiroglu et al. (2024), arXiv:2404.10102, with D = C / (6N) and the
  `drop_highest` highest-loss points dropped, as in their replication of Hoffmann et al. (2022)
  Approach 3."""
  t = read_csv(_path("chinchilla_epoch_2024.csv", data_dir))
  order = np.argsort(t["loss"], kind="stable")
  keep = np.sort(order[:len(order) - drop_highest])
  n, c, loss = t["Model Size"][keep], t["Training FLOP"][keep], t["loss"][keep]
  return {"N": n, "D": c / (6.0 * n), "C": c, "loss": loss}


def clark_final_points(router: str, data_dir: str | None = None) -> dict[str, np.ndarray]:
  """{N, E, loss} final-step validation losses for `router` of Clark et al. (2022),
  arXiv:2202.01169: the last step (with a validation loss) of every routed run with k = 1 and routing frequency 0.5, plus
  the dense runs (k = 1, FLOP increase 1) as the E = 1 points; seeds of one (N, E) averaged."""
  if router not in CLARK_ROUTERS:
    raise ValueError(f"router = {router!r} is not allowed: expected one of {CLARK_ROUTERS}")
  t = read_csv(_path("routed_lm_clark_2022.csv", data_dir))
  last = {}  # run -> row of its last step that has a validation loss
  for i, (run, step) in enumerate(zip(t["hyper_id"], t["step"])):
    if not np.isfinite(t["loss_validation"][i]):
      continue
    if run not in last or step > t["step"][last[run]]:
      last[run] = i
  groups: dict[tuple[float, float], list[float]] = {}
  for i in last.values():
    kind = t["router_type"][i]
    if t["k"][i] != 1 or t["routing_frequency"][i] != 0.5:
      continue
    if kind == router or (kind == "Dense" and t["flop_increase"][i] == 1.0):
      key = (t["dense_parameter_count"][i], 1.0 if kind == "Dense" else t["num_experts"][i])
      groups.setdefault(key, []).append(t["loss_validation"][i])
  keys = sorted(groups)
  return {"N": np.array([k[0] for k in keys]), "E": np.array([k[1] for k in keys]),
          "loss": np.array([np.mean(groups[k]) for k in keys])}
