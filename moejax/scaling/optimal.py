"""Compute-optimal allocation of a FLOP budget, and iso-FLOP curves.

Training compute C = D * flops_per_token(N, ...) with flops_per_token = 6N by default (Kaplan et al.
2020, arXiv:2001.08361; Hoffmann et al. 2022, arXiv:2203.15556). For Chinchilla the optimum has a
closed form; for every other law it is found numerically over log N and the law's architecture
variables (G, E) that are not fixed, with D = C / flops_per_token.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

import numpy as np
import scipy.optimize

from moejax.scaling.laws import Law

DEFAULT_BOUNDS = {"N": (1e5, 1e15), "G": (1.0, 64.0), "E": (1.0, 1024.0)}


@dataclasses.dataclass(frozen=True)
class Allocation:
  """The loss-minimising allocation of `flops`: variables {N, D, G, E...}, predicted loss, and the
  variables whose optimum sits on a bound (then the law alone does not pick them)."""
  flops: float
  variables: dict[str, float]
  loss: float
  at_bound: tuple[str, ...] = ()


def chinchilla_optimal(params: Mapping[str, float], flops: float) -> Allocation:
  """Closed-form optimum of L = E + A/N^alpha + B/D^beta under C = 6ND, Hoffmann et al. (2022),
  "Training Compute-Optimal Large Language Models", arXiv:2203.15556, Eq. (4):

      N* = G (C/6)^(beta/(alpha+beta)),  D* = G^-1 (C/6)^(alpha/(alpha+beta)),
      G = (alpha A / (beta B))^(1/(alpha+beta))
  """
  e, a, b, alpha, beta = (params[k] for k in ("E", "A", "B", "alpha", "beta"))
  g = (alpha * a / (beta * b)) ** (1.0 / (alpha + beta))
  n = g * (flops / 6.0) ** (beta / (alpha + beta))
  d = (flops / 6.0) ** (alpha / (alpha + beta)) / g
  return Allocation(flops=flops, variables={"N": n, "D": d},
                    loss=e + a / n ** alpha + b / d ** beta)


def six_n(N, **_):
  """Training FLOPs per token, 6N (Kaplan et al. 2020, arXiv:2001.08361)."""
  return 6.0 * N


def fine_grained_flops_per_token(c_r: float = 14.0, expansion: float = 64.0,
                                 aspect: float = 128.0) -> Callable:
  """6N plus a router cost that grows with granularity G, following the structure of the FLOP
  model of Krajewski et al. (2024), "Scaling Laws for Fine-Grained Mixture of Experts",
  arXiv:2402.07871: c_r * d_model * E * G per token and block, E = `expansion` experts.
  ASSUMPTIONS of this code (not checked against the paper): c_r = 14, E = 64, and the shape
  N = 12 d_model^2 n_blocks with d_model = aspect * n_blocks.
  """

  def flops(N, G=1.0, **_):
    d_model = (N * aspect / 12.0) ** (1.0 / 3.0)
    n_blocks = d_model / aspect
    return 6.0 * N + c_r * d_model * expansion * G * n_blocks

  return flops


def optimal_allocation(law: Law, params: Mapping[str, float], flops: float, *,
                       fixed: Mapping[str, float] | None = None,
                       bounds: Mapping[str, tuple[float, float]] | None = None,
                       flops_per_token: Callable | None = None) -> Allocation:
  """Minimises law(params) over N (and the law's G, E unless `fixed`) with D = flops /
  flops_per_token(N, G=..., E=...). Chinchilla without a custom cost uses the closed form of
  Hoffmann et al. (2022), arXiv:2203.15556; other laws (Kaplan et al. 2020, arXiv:2001.08361;
  Krajewski et al. 2024, arXiv:2402.07871; Ludziejewski et al. 2025, arXiv:2502.05172) are solved
  with scipy's L-BFGS-B in log space from a few starts.
  """
  law.check_params(params)
  if not flops > 0:
    raise ValueError(f"flops = {flops!r} is not allowed: expected a number > 0")
  if "D" not in law.variables:
    raise ValueError(f"law = {law.name!r} is not allowed here: compute-optimal allocation needs a "
                     f"token variable D, and its variables are {list(law.variables)}")
  fixed = dict(fixed or {})
  for k in fixed:
    if k not in law.variables or k in ("N", "D"):
      raise ValueError(f"fixed variable {k!r} is not allowed: expected one of "
                       f"{[v for v in law.variables if v not in ('N', 'D')]}")
  if law.name == "chinchilla" and flops_per_token is None:
    return chinchilla_optimal(params, flops)
  cost = flops_per_token or six_n
  bounds = {**DEFAULT_BOUNDS, **(bounds or {})}
  free = ["N"] + [v for v in law.variables if v not in ("N", "D") and v not in fixed]
  log_bounds = [(math.log(bounds[v][0]), math.log(bounds[v][1])) for v in free]

  def variables(z):
    out = {v: math.exp(x) for v, x in zip(free, z)}
    out.update(fixed)
    out["D"] = flops / cost(**{k: v for k, v in out.items() if k != "D"})
    return out

  def objective(z):
    with np.errstate(all="ignore"):
      value = float(law.loss(params, **variables(z))[()])
    return value if math.isfinite(value) else 1e30

  best = None
  n_starts = np.linspace(log_bounds[0][0] + 1, log_bounds[0][1] - 1, 7)
  for z0 in n_starts:
    start = [z0] + [0.5 * (lo + hi) for lo, hi in log_bounds[1:]]
    res = scipy.optimize.minimize(objective, start, method="L-BFGS-B", bounds=log_bounds)
    if best is None or res.fun < best.fun:
      best = res
  z = best.x
  at_bound = tuple(v for v, x, (lo, hi) in zip(free, z, log_bounds)
                   if min(x - lo, hi - x) < 1e-3 * max(1.0, hi - lo))
  return Allocation(flops=flops, variables=variables(z), loss=float(best.fun), at_bound=at_bound)


def isoflop_curve(law: Law, params: Mapping[str, float], flops: float, *, num: int = 50,
                  n_range: tuple[float, float] | None = None,
                  fixed: Mapping[str, float] | None = None,
                  flops_per_token: Callable | None = None) -> dict[str, np.ndarray]:
  """Loss along an iso-FLOP line (Hoffmann et al. 2022, arXiv:2203.15556, Approach 2): N on a
  log grid [num], D = flops / flops_per_token(N), other variables `fixed`. Returns {N, D, loss}.
  n_range defaults to 1/30x..30x the compute-optimal N."""
  fixed = dict(fixed or {})
  missing = [v for v in law.variables if v not in ("N", "D") and v not in fixed]
  if missing:
    raise ValueError(f"fixed = {fixed} lacks {missing}: an iso-FLOP curve of law {law.name!r} "
                     "needs every variable but N and D fixed")
  cost = flops_per_token or six_n
  if n_range is None:
    n_opt = optimal_allocation(law, params, flops, fixed=fixed,
                               flops_per_token=flops_per_token).variables["N"]
    n_range = (n_opt / 30.0, n_opt * 30.0)
  n = np.geomspace(n_range[0], n_range[1], num)
  d = flops / np.array([cost(N=x, **fixed) for x in n])
  return {"N": n, "D": d, "loss": law.loss(params, N=n, D=d, **fixed)}
