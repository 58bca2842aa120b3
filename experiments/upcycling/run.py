"""Upcycling experiment (issue 13): a dense model trained on the embedded synthetic data, then
four ways to spend the same extra training compute:

  sparse_upcycled  the dense checkpoint sparse-upcycled into an 8-expert top-2 MoE
                   ("Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints",
                   Komatsuzaki et al. 2022, arXiv:2212.05055)
  drop_upcycled    the same with Drop-Upcycling, r = 0.5 ("Drop-Upcycling: Training Sparse
                   Mixture of Experts with Partial Re-initialization", Nakamura et al. 2025,
                   arXiv:2502.19261; 0.5 is the paper's best)
  moe_scratch      the same MoE from a random initialisation
  dense_continued  the dense model trained further

Same extra compute: each MoE arm trains `moe_steps` steps; the dense arm trains as many steps
as give the same training FLOPs (`moejax.scaling.accounting.flops_per_token(...).exact`, 3 x
the forward matmul FLOPs; the MoE's two experts of the dense FFN's width make a token ~1.7x the
dense FLOPs). Every arm starts at step 0 with a fresh AdamW state and the same schedule (warm-up
10%, cosine to lr/10): the three continued arms are written by `python -m moejax.upcycle`'s
`upcycle()` (the dense arm with the dense config: a copy of every weight), so they differ only
in the model. They run at two peak learning rates: the pretraining peak 1e-2 (re-warmed) and
1e-3, where the dense run's cosine ended; the scratch MoE at 1e-2. Upcycled and continued arms
read on from the dense run's data position; the scratch arm starts at the beginning of the same
synthetic stream. Eval: the same 4 held-out batches everywhere, at step 0 and every tenth of a
run.

    python experiments/upcycling/run.py                  # ~11 min on 2 shared CPU cores
    python experiments/upcycling/run.py --report_only    # plot and table from results.csv
    python experiments/upcycling/run.py --budget tiny    # seconds, into runs/tiny: to try it

Writes `results.csv` (one row per arm, `moejax.sweep_results`; a rerun skips rows already there
and resumes a killed run from its workdir), `plots/loss.png` and prints the README's table.
Workdirs go to `runs/` (not committed).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
HERE = os.path.dirname(os.path.abspath(__file__))

import numpy as np  # noqa: E402

from moejax.config import load_config_file, set_fields  # noqa: E402
from moejax.sweep_results import append_row, finished_names  # noqa: E402

DENSE_CONFIG = os.path.join(ROOT, "configs", "dense.py")
MOE_CONFIG = os.path.join(HERE, "moe_config.py")


@dataclasses.dataclass(frozen=True)
class Budget:
  pretrain_steps: int
  moe_steps: int
  overrides: tuple[tuple[str, object], ...] = ()


BUDGETS = {
    "default": Budget(pretrain_steps=500, moe_steps=300),
    "tiny": Budget(pretrain_steps=20, moe_steps=10, overrides=(
        ("model.d_model", 32), ("model.num_layers", 1), ("model.num_heads", 2),
        ("model.num_kv_heads", 2), ("model.vocab_size", 32), ("model.max_len", 16),
        ("train.batch_size", 8), ("train.seq_len", 16), ("train.eval_batches", 2),
        ("data.num_domains", 4), ("data.branching", 2))),
}


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  config: str          # config file
  method: str | None   # upcycle --method; None: trained from scratch
  lr_scale: float = 1.0  # peak lr = lr_scale * the config's train.lr (1e-2)


# Two learning rates for the arms that start from the dense checkpoint: the pretraining peak
# (1e-2, re-warmed) and the dense run's final lr (1e-3 = lr/10 at the end of its cosine).
ARMS = (Arm("sparse_upcycled", MOE_CONFIG, "sparse"), Arm("drop_upcycled", MOE_CONFIG, "drop"),
        Arm("dense_continued", DENSE_CONFIG, "sparse"), Arm("moe_scratch", MOE_CONFIG, None),
        Arm("sparse_upcycled_lr1e-3", MOE_CONFIG, "sparse", 0.1),
        Arm("drop_upcycled_lr1e-3", MOE_CONFIG, "drop", 0.1),
        Arm("dense_continued_lr1e-3", DENSE_CONFIG, "sparse", 0.1))
DROP_RATE = 0.5

COLUMNS = ("name", "method", "lr", "pretrain_steps", "steps", "tokens", "flops_per_token",
           "extra_flops", "initial_eval_loss", "eval_loss", "train_loss", "loss_floor",
           "bayes_loss", "eval_steps", "eval_curve", "wall_s")


def flops_per_token(config) -> float:
  from moejax.scaling.accounting import flops_per_token as count  # noqa: PLC0415
  return count(config, seq_len=config.train.seq_len, causal=True).exact


def config_for(path: str, steps: int, budget: Budget):
  c = load_config_file(path)
  set_fields(c, budget.overrides)
  set_fields(c, {"train.steps": steps, "train.warmup_steps": max(1, steps // 10),
                 "train.eval_every": max(1, steps // 10), "train.log_every": max(1, steps // 20),
                 "train.checkpoint_every": steps, "train.keep_checkpoints": 1})
  return c


def arm_steps(budget: Budget) -> dict[str, int]:
  """Steps per arm at equal extra training FLOPs (the dense arm's rounded to a whole step)."""
  moe = flops_per_token(config_for(MOE_CONFIG, 1, budget))
  dense = flops_per_token(config_for(DENSE_CONFIG, 1, budget))
  return {a.name: (budget.moe_steps if a.config == MOE_CONFIG else
                   int(round(budget.moe_steps * moe / dense))) for a in ARMS}


def initial_eval(config, workdir: str) -> float:
  """Eval loss at step 0 (the workdir's step-0 checkpoint, or a fresh initialisation) on the
  batches train_and_evaluate evaluates on; cached in `workdir/initial_eval.json`."""
  path = os.path.join(workdir, "initial_eval.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)["eval/loss"]
  from moejax import checkpoint, data  # noqa: PLC0415
  from moejax.train import Trainer  # noqa: PLC0415
  trainer = Trainer(config)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    with checkpoint.Checkpointer(ckpt_dir, keep=1, every=0) as c:
      _, state, _ = c.restore(0, abstract_state=trainer.abstract_state())
  else:
    state = trainer.init_state()
  source = data.make_source(config, "eval")
  batches = [trainer.put_batch(source.next()) for _ in range(config.train.eval_batches)]
  loss = trainer.evaluate(state["params"], batches)["eval/loss"]
  os.makedirs(workdir, exist_ok=True)
  with open(path, "w") as f:
    json.dump({"eval/loss": loss}, f)
  return loss


def run(budget: Budget, runs_dir: str, results_path: str, log=print) -> None:
  from moejax.plot import read_series  # noqa: PLC0415
  from moejax.train import train_and_evaluate  # noqa: PLC0415
  from moejax.upcycle import upcycle  # noqa: PLC0415
  dense_dir = os.path.join(runs_dir, "dense_pretrain")
  dense_cfg = config_for(DENSE_CONFIG, budget.pretrain_steps, budget)
  tic = time.perf_counter()
  summary = train_and_evaluate(dense_cfg, dense_dir, progress=False)
  log(f"dense pretraining: {summary['step']} steps, eval {summary['eval/loss']:.4f} "
      f"({time.perf_counter() - tic:.0f} s)")
  done = finished_names(results_path)
  steps = arm_steps(budget)
  for arm in ARMS:
    if arm.name in done:
      continue
    config = config_for(arm.config, steps[arm.name], budget)
    config.train.lr = config.train.lr * arm.lr_scale
    workdir = os.path.join(runs_dir, arm.name)
    tic = time.perf_counter()
    if arm.method and not os.path.exists(os.path.join(workdir, "upcycle.json")):
      upcycle(dense_dir, config, workdir, method=arm.method,
              drop_rate=DROP_RATE if arm.method == "drop" else None)
    initial = initial_eval(config, workdir)
    summary = train_and_evaluate(config, workdir, progress=False)
    if summary.get("stopped_early"):
      log(f"{arm.name}: stopped at step {summary['step']}; rerun to resume")
      return
    series = read_series(workdir)
    eval_steps, curve = series["eval/loss"]
    t = config.train
    fpt = flops_per_token(config)
    tokens = t.steps * t.batch_size * t.seq_len
    row = {"name": arm.name, "method": arm.method or "scratch", "lr": t.lr,
           "pretrain_steps": budget.pretrain_steps, "steps": t.steps, "tokens": tokens,
           "flops_per_token": fpt, "extra_flops": fpt * tokens, "initial_eval_loss": initial,
           "eval_loss": float(curve[-1]), "train_loss": float(series["train/loss"][1][-1]),
           "loss_floor": float(series["data/loss_floor"][1][0]),
           "bayes_loss": float(series["data/bayes_loss"][1][0]),
           "eval_steps": ";".join(str(int(s)) for s in eval_steps),
           "eval_curve": ";".join(f"{v:.5f}" for v in curve),
           "wall_s": round(time.perf_counter() - tic, 1)}
    append_row(results_path, row, COLUMNS)
    log(f"{arm.name}: {t.steps} steps, eval {initial:.4f} -> {row['eval_loss']:.4f} "
        f"({row['wall_s']:.0f} s)")


def read_results(results_path: str) -> list[dict]:
  with open(results_path, newline="") as f:
    rows = list(csv.DictReader(f))
  for r in rows:
    for k in COLUMNS:
      if k not in ("name", "method", "eval_steps", "eval_curve"):
        r[k] = float(r[k])
    r["eval_steps"] = np.array([0.0] + [float(s) for s in r["eval_steps"].split(";")])
    r["eval_curve"] = np.array([r["initial_eval_loss"]]
                               + [float(v) for v in r["eval_curve"].split(";")])
  return rows


def report(results_path: str, runs_dir: str, plot_path: str) -> str:
  """The markdown table of results.csv and the plot: eval loss against extra training FLOPs
  (left) and tokens (right), one row of panels per learning rate of the continued arms (the
  scratch MoE, at 1e-2, in both), with the dense checkpoint's eval loss and the Bayes loss."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  rows = read_results(results_path)
  dense_final = None
  metrics = os.path.join(runs_dir, "dense_pretrain", "metrics.jsonl")
  if os.path.exists(metrics):
    from moejax.plot import read_series  # noqa: PLC0415
    dense_final = float(read_series(metrics)["eval/loss"][1][-1])
  lrs = sorted({r["lr"] for r in rows if r["method"] != "scratch"}, reverse=True)
  fig, axes = plt.subplots(len(lrs), 2, figsize=(11, 4 * len(lrs)), squeeze=False)
  colors = {"sparse": "C0", "drop": "C1", "scratch": "C2", "dense": "C3"}
  bayes = rows[0]["bayes_loss"]
  for panel, lr in zip(axes, lrs):
    shown = [r for r in rows if r["lr"] == lr or r["method"] == "scratch"]
    for r in shown:
      tokens = r["eval_steps"] * r["tokens"] / r["steps"]
      color = colors["dense" if r["name"].startswith("dense") else r["method"]]
      for ax, x in zip(panel, (tokens * r["flops_per_token"], tokens)):
        ax.plot(x, r["eval_curve"], marker="o", ms=3, color=color,
                label=f"{r['name']} (lr {r['lr']:g})")
    for ax, label in zip(panel, ("extra training FLOPs", "extra training tokens")):
      if dense_final is not None:
        ax.axhline(dense_final, color="gray", ls="--", lw=1, label="dense checkpoint")
      ax.axhline(bayes, color="black", ls=":", lw=1, label="Bayes loss")
      ax.set_xlabel(label)
      ax.set_ylabel("eval loss (nats/token)")
      ax.set_ylim(bayes - 0.05, max(r["eval_curve"][2] for r in shown) + 0.1)
      ax.grid(alpha=0.3)
    panel[0].set_title(f"equal extra compute; continued arms at lr {lr:g}")
    panel[1].set_title("the same runs against tokens")
    panel[1].legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(plot_path), exist_ok=True)
  fig.savefig(plot_path, dpi=110)
  plt.close(fig)
  lines = ["| arm | peak lr | steps | extra tokens | extra FLOPs | eval loss at step 0 "
           "| final eval loss | - Bayes |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for r in rows:
    lines.append(f"| {r['name']} | {r['lr']:g} | {int(r['steps'])} | {int(r['tokens']):,} | "
                 f"{r['extra_flops']:.3g} | {r['initial_eval_loss']:.4f} | {r['eval_loss']:.4f} "
                 f"| {r['eval_loss'] - bayes:+.4f} |")
  if dense_final is not None:
    lines.append(f"\nDense checkpoint (step {int(rows[0]['pretrain_steps'])}): eval loss "
                 f"{dense_final:.4f}; Bayes loss {bayes:.4f}; entropy-rate floor "
                 f"{rows[0]['loss_floor']:.4f}.")
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--budget", default="default", choices=sorted(BUDGETS))
  p.add_argument("--out", default=None,
                 help="where results.csv, plots/ and runs/ go (default: this folder; "
                      "runs/<budget> for a budget other than default)")
  p.add_argument("--report_only", action="store_true")
  args = p.parse_args(argv)
  out = args.out or (HERE if args.budget == "default" else os.path.join(HERE, "runs", args.budget))
  runs_dir, results = os.path.join(out, "runs"), os.path.join(out, "results.csv")
  if not args.report_only:
    run(BUDGETS[args.budget], runs_dir, results)
  plot = os.path.join(out, "plots", "loss.png")
  print(report(results, runs_dir, plot))
  print(f"plot: {plot}")


if __name__ == "__main__":
  main()
