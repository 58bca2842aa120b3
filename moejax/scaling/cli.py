"""Command line: `python -m moejax.scaling fit ...` and `python -m moejax.scaling optimal ...`.

fit: fits a registered law to a CSV (one column per law variable and `loss`; `--column VAR=EXPR`
derives columns), prints a table with bootstrap intervals, and ends with one JSON line of the
fitted parameters named as in the paper's formula. optimal: prints the compute-optimal allocation
of a FLOP budget for given parameters, ending with one JSON line. Procedures: Hoffmann et al.
(2022), arXiv:2203.15556; Besiroglu et al. (2024), arXiv:2404.10102.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from moejax.scaling import tables
from moejax.scaling.fitting import LOSSES, fit
from moejax.scaling.laws import LAWS, get_law
from moejax.scaling.optimal import fine_grained_flops_per_token, optimal_allocation


def _pairs(items: list[str], flag: str) -> dict[str, str]:
  out = {}
  for item in items or []:
    k, sep, v = item.partition("=")
    if not sep:
      raise ValueError(f"{flag} {item!r} is not allowed: expected NAME=VALUE")
    out[k.strip()] = v.strip()
  return out


def _subsample(starts: np.ndarray, k: int | None) -> np.ndarray:
  if not k or k >= len(starts):
    return starts
  return starts[np.unique(np.linspace(0, len(starts) - 1, k).round().astype(int))]


def run_fit(args) -> dict:
  law = get_law(args.law)
  table = tables.read_csv(args.data)
  table = tables.select(table, _pairs(args.where, "--where"))
  table = tables.add_columns(table, args.column or [])
  cols = {k: table[k] for k in list(law.variables) + ["loss"] if k in table}
  result = fit(law, cols, loss=args.loss, delta=args.delta, bootstrap=args.bootstrap,
               starts=_subsample(law.start_grid(), args.starts), max_iter=args.max_iter,
               seed=args.seed)
  pct = int(round(100 * result.confidence))
  print(f"law {law.name}: {law.formula}")
  print(f"paper: {law.paper} (arXiv:{law.arxiv})")
  print(f"{result.num_points} points, {result.num_starts} starts, loss {result.loss}"
        + (f" (delta {result.delta:g})" if result.loss == "huber" else "")
        + f", objective {result.objective:.10g}, RMSE(ln L) {result.rmse_log:.5f}")
  header = f"{'parameter':>12}  {'value':>14}" + (f"  {pct}% interval ({args.bootstrap} bootstrap)"
                                                   if result.intervals else "")
  print(header)
  for k in law.param_names:
    line = f"{k:>12}  {result.params[k]:>14.6g}"
    if result.intervals:
      lo, hi = result.intervals[k]
      line += f"  [{lo:.6g}, {hi:.6g}]"
    print(line)
  if args.plot:
    from moejax.scaling.plots import plot_fit
    plot_fit(result, cols, args.plot)
    print(f"plot written to {args.plot}")
  params = {k: float(result.params[k]) for k in law.param_names}
  print(json.dumps(params))
  return params


def run_optimal(args) -> dict:
  law = get_law(args.law)
  try:
    params = json.loads(args.params)
  except json.JSONDecodeError as e:
    raise ValueError(f"--params {args.params!r} is not JSON: {e.msg}") from None
  fixed = {k: float(v) for k, v in _pairs(args.fixed, "--fixed").items()}
  bounds = {}
  for k, v in _pairs(args.bounds, "--bounds").items():
    lo, sep, hi = v.partition(":")
    if not sep:
      raise ValueError(f"--bounds {k}={v!r} is not allowed: expected NAME=LOW:HIGH")
    bounds[k] = (float(lo), float(hi))
  cost = fine_grained_flops_per_token() if law.name == "fine_grained" else None
  out = {}
  for flops in args.flops:
    alloc = optimal_allocation(law, params, flops, fixed=fixed, bounds=bounds, flops_per_token=cost)
    v = alloc.variables
    extra = "".join(f"  {k}*={v[k]:.4g}" for k in law.variables if k not in ("N", "D"))
    note = f"  (on the bound: {', '.join(alloc.at_bound)})" if alloc.at_bound else ""
    print(f"C={flops:.3g}  N*={v['N']:.4g}  D*={v['D']:.4g}  D/N={v['D'] / v['N']:.3g}{extra}"
          f"  L*={alloc.loss:.5g}{note}")
    out[f"{flops:g}"] = {**{k: float(x) for k, x in v.items()}, "loss": float(alloc.loss)}
  if law.name == "chinchilla":
    a, b = params["alpha"], params["beta"]
    print(f"N* ~ C^{b / (a + b):.4f}, D* ~ C^{a / (a + b):.4f}")
  print(json.dumps(out if len(args.flops) > 1 else next(iter(out.values()))))
  return out


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m moejax.scaling", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  f = sub.add_parser("fit", help="fit a law to a CSV of data points")
  f.add_argument("--law", required=True, choices=sorted(LAWS))
  f.add_argument("--data", required=True, help="CSV with the law's variables and `loss`")
  f.add_argument("--column", action="append", metavar="VAR=EXPR",
                 help='derived column, e.g. D="Training FLOP"/(6*"Model Size")')
  f.add_argument("--where", action="append", metavar="COL=VALUE", help="keep rows with COL == VALUE")
  f.add_argument("--loss", default="huber", choices=LOSSES)
  f.add_argument("--delta", type=float, default=1e-3, help="Huber delta on log-loss residuals")
  f.add_argument("--bootstrap", type=int, default=100, help="resamples for intervals (0: none)")
  f.add_argument("--starts", type=int, default=None, help="use only this many grid starts")
  f.add_argument("--max-iter", type=int, default=40, help="L-BFGS iterations over all starts")
  f.add_argument("--seed", type=int, default=0)
  f.add_argument("--plot", default=None, help="write data, fit and residuals to this PNG")
  o = sub.add_parser("optimal", help="compute-optimal allocation of a FLOP budget")
  o.add_argument("--law", required=True, choices=sorted(LAWS))
  o.add_argument("--params", required=True, help="JSON of the law's parameters (paper names)")
  o.add_argument("--flops", required=True, type=float, nargs="+")
  o.add_argument("--fixed", action="append", metavar="VAR=VALUE", help="fix G or E")
  o.add_argument("--bounds", action="append", metavar="VAR=LOW:HIGH", help="search range of N, G, E")
  return p


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    if args.command == "fit":
      run_fit(args)
    else:
      run_optimal(args)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0
