"""A scaling sweep of small dense and MoE moejax models on the embedded synthetic data, then a fit of
the fine-grained MoE law and a plot of loss against training compute per granularity.

The grid crosses model sizes (width and depth), FFN variants (dense, and E=8 experts at
granularity G = 1, 2, 4: E*G experts of width d_ff/G, top-G; "Scaling Laws for Fine-Grained
Mixture of Experts", Krajewski et al. 2024, arXiv:2402.07871) and token budgets. Every run is one
`moejax.train.train_and_evaluate` with its own workdir and a cosine schedule ending at its own
budget (Hoffmann et al. 2022, arXiv:2203.15556: one run per budget, not intermediate points of
a longer run). Each finished run appends one row to `results/sweep.csv`; a restart skips the
rows already there and resumes an interrupted run from its last checkpoint, so killing the
sweep loses at most one checkpoint interval.

The fine-grained law L(N, D, G) = c + (g/G^gamma + a)/N^alpha + b/D^beta is then fitted to the
MoE rows with N = total non-embedding parameters (as in Krajewski et al., whose runs fix the
expansion rate, as this grid does: E = 8 at every G) and D = training tokens (Huber on log loss,
`moejax.scaling.fit`), and `results/loss_vs_compute.png` plots eval loss against training FLOPs
(the exact count of `moejax.scaling.accounting.flops_per_token`, causal attention) per
granularity, with the dense runs for reference. The synthetic data's Bayes loss (the best any
model can reach at this sequence length) is a check on the fitted irreducible term c.

    python experiments/scaling/sweep.py                  # the default grid: ~30 min, 2 CPU cores
    python experiments/scaling/sweep.py --dry_run        # the grid, its parameters and FLOPs
    python experiments/scaling/sweep.py --fit_only       # refit and replot the results file
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable, Iterable

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
HERE = os.path.dirname(os.path.abspath(__file__))

import numpy as np  # noqa: E402

from moejax.config import load_config_file, set_fields  # noqa: E402
from moejax.scaling.accounting import flops_per_token, param_counts  # noqa: E402
from moejax import sweep_results  # noqa: E402

# Columns of the results file, in order. N_* count parameters (accounting.param_counts), D is
# training tokens, C = flops_per_token * D is training FLOPs (exact count, causal attention).
COLUMNS = ("name", "size", "ffn", "d_model", "num_layers", "d_ff", "num_experts", "top_k", "G",
           "steps", "D", "N_total", "N_active", "N_total_nonemb", "N_active_nonemb",
           "flops_per_token", "C", "loss", "train_loss", "bayes_loss", "loss_floor", "max_vio",
           "wall_s", "tokens_per_s")


@dataclasses.dataclass(frozen=True)
class Size:
  """A model shape: width d_model (heads of 16), depth, FFN width d_ff (dense or per expert)."""
  name: str
  d_model: int
  num_layers: int
  d_ff: int


@dataclasses.dataclass(frozen=True)
class Ffn:
  """An FFN variant: dense (granularity 0) or `num_experts` experts split `granularity` ways."""
  name: str
  granularity: int            # 0: dense
  num_experts: int = 8
  top_k: int = 1


@dataclasses.dataclass(frozen=True)
class Grid:
  """The cross product sizes x ffns x steps; `overrides` are dotted config fields set on every
  run (e.g. the batch size). Tokens per run = steps * batch_size * seq_len."""
  sizes: tuple[Size, ...]
  ffns: tuple[Ffn, ...]
  steps: tuple[int, ...]
  overrides: tuple[tuple[str, object], ...] = ()


DENSE = Ffn("dense", 0)
GRIDS = {
    # About 30 minutes on 2 CPU cores with the blocked gmm backend (see the README's timing).
    "default": Grid(
        sizes=(Size("d32L2", 32, 2, 64), Size("d48L3", 48, 3, 96), Size("d64L4", 64, 4, 128)),
        ffns=(DENSE, Ffn("moe8g1", 1), Ffn("moe8g2", 2), Ffn("moe8g4", 4)),
        steps=(250, 500, 1000, 2000)),
    # Seconds: for tests and for trying the script.
    "tiny": Grid(
        sizes=(Size("d32L1", 32, 1, 32),),
        ffns=(DENSE, Ffn("moe4g2", 2, num_experts=4)),
        steps=(6,),
        overrides=(("train.batch_size", 4), ("train.seq_len", 16), ("model.max_len", 16),
                   ("model.vocab_size", 32), ("data.num_domains", 2), ("data.branching", 2),
                   ("train.eval_batches", 2), ("mesh.data", 1))),
}


@dataclasses.dataclass(frozen=True)
class Run:
  """One point of the grid."""
  size: Size
  ffn: Ffn
  steps: int

  @property
  def name(self) -> str:
    return f"{self.size.name}-{self.ffn.name}-s{self.steps}"


def grid_runs(grid: Grid) -> list[Run]:
  """Every run of `grid`, cheapest first (fewest steps, then smallest model)."""
  runs = [Run(s, f, n) for n in grid.steps for s in grid.sizes for f in grid.ffns]
  return sorted(runs, key=lambda r: (r.steps, r.size.d_model * r.size.num_layers))


def run_config(run: Run, grid: Grid, gmm_backend: str = "blocked"):
  """The moejax config of `run`: configs/default.py with the run's shape, FFN and budget."""
  c = load_config_file(os.path.join(ROOT, "configs", "default.py"))
  s, f, m = run.size, run.ffn, c.model
  m.update(d_model=s.d_model, num_layers=s.num_layers, d_ff=s.d_ff, head_dim=16,
           num_heads=s.d_model // 16, num_kv_heads=s.d_model // 16)
  if f.granularity == 0:
    m.moe_every = 0
  else:
    m.moe.update(num_experts=f.num_experts, top_k=f.top_k, granularity=f.granularity,
                 dispatch="dropless", gmm_backend=gmm_backend)
  t = c.train
  t.update(steps=run.steps, warmup_steps=max(1, run.steps // 10), eval_every=run.steps,
           eval_batches=16, checkpoint_every=max(1, run.steps // 2), keep_checkpoints=1,
           log_every=max(1, run.steps // 5))
  return set_fields(c, grid.overrides)


def run_row(run: Run, config, summary: dict, wall_s: float) -> dict:
  """The results-file row of a finished run (see COLUMNS)."""
  counts = param_counts(config)
  fpt = flops_per_token(config, causal=True).exact
  tokens = run.steps * config.train.batch_size * config.train.seq_len
  dims_e = run.ffn.num_experts * run.ffn.granularity if run.ffn.granularity else 0
  dims_k = run.ffn.top_k * run.ffn.granularity if run.ffn.granularity else 0
  return {"name": run.name, "size": run.size.name, "ffn": run.ffn.name,
          "d_model": run.size.d_model, "num_layers": run.size.num_layers, "d_ff": run.size.d_ff,
          "num_experts": dims_e, "top_k": dims_k, "G": run.ffn.granularity, "steps": run.steps,
          "D": tokens, "N_total": counts.total, "N_active": counts.active,
          "N_total_nonemb": counts.total_non_embedding,
          "N_active_nonemb": counts.active_non_embedding, "flops_per_token": fpt,
          "C": fpt * tokens, "loss": summary["eval/loss"],
          "train_loss": summary.get("train/loss", float("nan")),
          "bayes_loss": summary.get("data/bayes_loss", float("nan")),
          "loss_floor": summary.get("data/loss_floor", float("nan")),
          "max_vio": summary.get("moe/max_vio", float("nan")), "wall_s": round(wall_s, 2),
          "tokens_per_s": summary.get("train/tokens_per_s", float("nan"))}


def append_row(results_path: str, row: dict) -> None:
  """Appends `row`'s COLUMNS to the results CSV (`moejax.sweep_results.append_row`)."""
  sweep_results.append_row(results_path, row, COLUMNS)


def run_grid(grid: Grid, results_path: str, workdir_root: str, *, gmm_backend: str = "blocked",
             only: str | None = None, train_fn: Callable | None = None,
             log: Callable[[str], None] = print) -> list[dict]:
  """Trains every run of `grid` not yet in `results_path`, appending a row after each; returns
  the rows added. `train_fn(config, workdir)` defaults to `moejax.train.train_and_evaluate`. A
  run that stops early (SIGTERM) appends nothing; running again resumes it from `workdir_root`."""
  if train_fn is None:
    from moejax.train import train_and_evaluate  # noqa: PLC0415
    train_fn = lambda config, workdir: train_and_evaluate(config, workdir, progress=False)
  os.makedirs(os.path.dirname(os.path.abspath(results_path)), exist_ok=True)
  done = sweep_results.finished_names(results_path)
  todo = [r for r in grid_runs(grid) if r.name not in done and (not only or only in r.name)]
  log(f"{len(done)} runs already in {results_path}; {len(todo)} to train")
  added = []
  for i, run in enumerate(todo):
    config = run_config(run, grid, gmm_backend)
    tic = time.perf_counter()
    summary = train_fn(config, os.path.join(workdir_root, run.name))
    wall = time.perf_counter() - tic
    if summary.get("stopped_early"):
      log(f"{run.name}: stopped at step {summary.get('step')}; rerun to resume")
      break
    row = run_row(run, config, summary, wall)
    append_row(results_path, row)
    added.append(row)
    log(f"[{i + 1}/{len(todo)}] {run.name}: loss {row['loss']:.4f}  C {row['C']:.3g}  "
        f"N_act {row['N_active_nonemb']}  {wall:.0f} s")
  return added


def read_results(results_path: str) -> dict[str, np.ndarray]:
  """The results file as columns (moejax.scaling.tables.read_csv)."""
  from moejax.scaling.tables import read_csv  # noqa: PLC0415
  return read_csv(results_path)


def fit_fine_grained(table: dict[str, np.ndarray], *, bootstrap: int = 100,
                     c: float | None = None):
  """Fits the fine-grained law to the MoE rows of `table` (N = total non-embedding parameters as
  in Krajewski et al. 2024, arXiv:2402.07871, Sec. 5; D = tokens, G = granularity), with the
  irreducible term c free or held at `c`; returns the FitResult."""
  from moejax.scaling import FixedParams, fit, get_law  # noqa: PLC0415
  moe = table["G"] > 0
  data = {"N": table["N_total_nonemb"][moe], "D": table["D"][moe], "G": table["G"][moe],
          "loss": table["loss"][moe]}
  law = get_law("fine_grained") if c is None else FixedParams(get_law("fine_grained"), c=c)
  return fit(law, data, bootstrap=bootstrap)


def plot_loss_vs_compute(table: dict[str, np.ndarray], result, path: str) -> None:
  """Eval loss against training FLOPs, one colour per granularity (dense in black), runs of one
  model joined across budgets; the fitted law at each MoE run (crosses); the data's Bayes loss.
  Right: fitted against measured loss."""
  from moejax.scaling.plots import plt  # noqa: PLC0415  (Agg backend)
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.6))
  gs = sorted(set(int(g) for g in table["G"]))
  colors = {g: plt.cm.viridis(i / max(len(gs) - 1, 1)) for i, g in enumerate(gs) if g > 0}
  colors[0] = "k"
  law, params = result.law, result.params
  for g in gs:
    sel = table["G"] == g
    label = "dense" if g == 0 else f"MoE G={g}"
    for j, size in enumerate(sorted(set(table["size"][sel]))):
      rows = sel & (table["size"] == size)
      order = np.argsort(table["C"][rows])
      c, loss = table["C"][rows][order], table["loss"][rows][order]
      ax0.plot(c, loss, "o-", color=colors[g], ms=4, lw=1, label=label if j == 0 else None)
      if g > 0:
        pred = law.loss(params, N=table["N_total_nonemb"][rows][order],
                        D=table["D"][rows][order], G=np.full(rows.sum(), float(g)))
        ax0.plot(c, pred, "x", color=colors[g], ms=6)
        ax1.scatter(loss, pred, color=colors[g], s=14)
  bayes = float(np.nanmean(table["bayes_loss"]))
  ax0.axhline(bayes, color="grey", ls="--", lw=0.8, label=f"Bayes loss {bayes:.3f}")
  ax0.set(xscale="log", xlabel="training FLOPs C (exact count)", ylabel="eval loss (nats)",
          title="loss vs compute per granularity (x: fine-grained fit)")
  ax0.legend(fontsize=8)
  moe = table["G"] > 0
  lo, hi = float(table["loss"][moe].min()), float(table["loss"][moe].max())
  ax1.plot([lo, hi], [lo, hi], "k-", lw=0.8)
  ax1.set(xlabel="measured eval loss", ylabel="fitted L(N, D, G)",
          title=f"fine-grained fit, RMSE {result.rmse_log:.4f} in ln L")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def summarize_fit(result, table: dict[str, np.ndarray], fixed=None) -> dict:
  """JSON-ready fit summary: parameters, intervals and RMSE of `result` (c free), the same law
  fitted with c held at the data's Bayes loss (`fixed`, optional), and the data's Bayes loss and
  entropy-rate floor, against which the fitted c can be checked."""
  out = {"law": result.law.name, "formula": result.law.formula, "params": result.params,
         "rmse_log": result.rmse_log, "objective": result.objective,
         "num_points": result.num_points,
         "N": "total non-embedding parameters", "D": "training tokens",
         "bayes_loss": float(np.nanmean(table["bayes_loss"])),
         "loss_floor": float(np.nanmean(table["loss_floor"]))}
  if result.intervals:
    out["intervals_95"] = {k: list(v) for k, v in result.intervals.items()}
  if fixed is not None:
    out["c_fixed_at_bayes_loss"] = {"params": fixed.params, "rmse_log": fixed.rmse_log,
                                    "objective": fixed.objective}
  return out


def main(argv: Iterable[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--grid", default="default", choices=sorted(GRIDS))
  p.add_argument("--results_dir", default=os.path.join(HERE, "results"))
  p.add_argument("--workdir_root", default=os.path.join(ROOT, "runs", "scaling_sweep"),
                 help="one workdir per run (checkpoints, metrics); not committed")
  p.add_argument("--gmm_backend", default="blocked",
                 help="moejax.kernels.GMM_BACKENDS entry for the MoE runs")
  p.add_argument("--only", default=None, help="train only runs whose name contains this")
  p.add_argument("--dry_run", action="store_true", help="print the grid and exit")
  p.add_argument("--fit_only", action="store_true", help="skip training; fit and plot")
  p.add_argument("--bootstrap", type=int, default=100)
  args = p.parse_args(argv)
  grid = GRIDS[args.grid]
  results_path = os.path.join(args.results_dir, "sweep.csv")
  if args.dry_run:
    total = 0.0
    for run in grid_runs(grid):
      c = run_config(run, grid, args.gmm_backend)
      counts = param_counts(c)
      flops = flops_per_token(c, causal=True).exact * run.steps * c.train.batch_size * c.train.seq_len
      total += flops
      print(f"{run.name:22s} N_act {counts.active_non_embedding:8d}  N_tot "
            f"{counts.total_non_embedding:8d}  C {flops:.3g}")
    print(f"{len(grid_runs(grid))} runs, {total:.3g} training FLOPs in all")
    return 0
  if not args.fit_only:
    tic = time.perf_counter()
    run_grid(grid, results_path, args.workdir_root, gmm_backend=args.gmm_backend,
             only=args.only)
    print(f"sweep wall time this invocation: {time.perf_counter() - tic:.0f} s")
  table = read_results(results_path)
  if not (table["G"] > 0).sum() >= 8:
    print("fewer than 8 MoE runs in the results: not fitting")
    return 0
  result = fit_fine_grained(table, bootstrap=args.bootstrap)
  fixed = fit_fine_grained(table, bootstrap=0, c=float(np.nanmean(table["bayes_loss"])))
  summary = summarize_fit(result, table, fixed)
  with open(os.path.join(args.results_dir, "fine_grained_fit.json"), "w") as f:
    json.dump(summary, f, indent=1)
  plot_loss_vs_compute(table, result, os.path.join(args.results_dir, "loss_vs_compute.png"))
  print(f"{'param':>6s} {'fit':>10s}  95% bootstrap")
  for k, v in result.params.items():
    lo, hi = (result.intervals or {}).get(k, (math.nan, math.nan))
    print(f"{k:>6s} {v:10.4g}  [{lo:.4g}, {hi:.4g}]")
  print(f"RMSE(ln L) {result.rmse_log:.4f} over {result.num_points} MoE runs; Bayes loss "
        f"{summary['bayes_loss']:.4f} vs fitted c {result.params['c']:.4f}; with c held at the "
        f"Bayes loss, RMSE(ln L) {fixed.rmse_log:.4f}")
  print(json.dumps(summary["params"]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
