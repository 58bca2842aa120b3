"""Reproduces Besiroglu et al. (2024), "Chinchilla Scaling: A replication attempt",
arXiv:2404.10102: Hoffmann et al.'s Approach 3 (arXiv:2203.15556) refitted on the 240 extracted
points: Huber (delta 1e-3) on log-loss residuals, summed; L-BFGS from their 4,500-start grid.

Run: python experiments/scaling/reproduce_epoch.py [--bootstrap 200] [--plot out.png]
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from moejax.scaling import fit, get_law  # noqa: E402
from moejax.scaling.optimal import chinchilla_optimal  # noqa: E402
from moejax.scaling.published import chinchilla_epoch  # noqa: E402

PUBLISHED = {"A": 477.84, "B": 2143.86, "E": 1.8172, "alpha": 0.3473, "beta": 0.3672}
PUBLISHED_OBJECTIVE = 0.0010182740


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--bootstrap", type=int, default=200)
  p.add_argument("--plot", default=None)
  args = p.parse_args()
  law, data = get_law("chinchilla"), chinchilla_epoch()
  start = time.perf_counter()
  r = fit(law, data, bootstrap=args.bootstrap)
  seconds = time.perf_counter() - start
  print(f"{r.num_points} points, {r.num_starts} starts, {seconds:.1f} s (incl. compile and "
        f"{args.bootstrap} bootstrap fits)")
  print(f"objective {r.objective:.10f} (published {PUBLISHED_OBJECTIVE:.10f})")
  print(f"{'':>6} {'fitted':>10} {'published':>10} {'rel. diff':>10}  95% bootstrap interval")
  for k in ("A", "B", "E", "alpha", "beta"):
    lo, hi = r.intervals[k] if r.intervals else (float("nan"),) * 2
    print(f"{k:>6} {r.params[k]:>10.4f} {PUBLISHED[k]:>10.4f} "
          f"{r.params[k] / PUBLISHED[k] - 1:>+10.2e}  [{lo:.4g}, {hi:.4g}]")
  a, b = r.params["alpha"], r.params["beta"]
  print(f"compute-optimal exponents: N* ~ C^{b / (a + b):.4f}, D* ~ C^{a / (a + b):.4f}")
  for c in (1e21, 5.76e23):
    v = chinchilla_optimal(r.params, c).variables
    print(f"  C = {c:.3g}: N* = {v['N']:.3g}, D* = {v['D']:.3g}, D/N = {v['D'] / v['N']:.1f}")
  if args.plot:
    from moejax.scaling.plots import plot_fit
    plot_fit(r, data, args.plot)
  print(json.dumps({k: r.params[k] for k in law.param_names}))


if __name__ == "__main__":
  main()
