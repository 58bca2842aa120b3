"""The router comparison of issue 11: every registered router (and balancing variants of top-k)
trained on the default config with the same token budget, seeds and active FLOPs; then a results
CSV, a markdown table, overlay plots and a bar chart.

Variants (`VARIANTS`): each router of `moejax.moe.routing.ROUTERS` with its defaults, plus
- `topk_lossfree`: top-k with auxiliary-loss-free balancing and no auxiliary loss
  ("Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts", Wang et al. 2024,
  arXiv:2408.15664; bias update rate u = 1e-3 as in the paper);
- `topk_micro`: top-k with the load-balancing loss over each device's micro-batch instead of the
  global batch ("Demons in the Detail: On Implementing Load Balancing Loss for Training
  Specialized Mixture-of-Expert Models", Qiu et al. 2025, arXiv:2501.11873). `topk` itself
  balances over the global batch.
A router not registered yet is skipped with a note, so the script picks routers up as they land.

Same budget: every run trains `steps` steps of the default batch (16 x 64 tokens) on the same
synthetic data (data.seed 0) from model seeds `--seeds`. Same active FLOPs: top-2 of 8 experts
everywhere; top-1 routers (switch, BASE) get experts twice as wide (d_ff 256), as Switch Transformer
compares FLOP-matched models (Fedus et al. 2021, arXiv:2101.03961); expert choice takes
C = T * K / E tokens per expert (capacity factor 1: K experts per token on average, Zhou et al.
2022, "Mixture-of-Experts with Expert Choice Routing", arXiv:2202.09368); routers whose expert
count per token is dynamic (top_p, relu) keep their papers' defaults and the table shows what
they used (`experts_per_token`). Every run uses the 8-device data mesh (simulated CPU devices),
so that a micro-batch (2 sequences) differs from the global batch (16): micro-batch balancing
then sees what a data-parallel device sees alone.

Measured per run: final eval loss and its gap to the data's loss floor (entropy rate) and Bayes
loss; MaxVio, dropped fraction and experts per token (means over the MoE layers and over the
logged steps of the last quarter of training, so one batch's noise does not decide); train
tokens/s (median of the logged intervals after the first, which holds compilation); the
expert-domain mutual information I(expert; domain) of the trained model's evaluation routing
over the held-out batches (mean and max over layers; `moejax.moe.analysis`); and the eval-loss
curve, from which the report reads how many steps each run needs to reach top-k's final loss.

Resumable as experiments/scaling/sweep.py: each run trains in `runs/<variant>_s<seed>` and,
when finished, appends one row to `results.csv`; a restart skips the rows already there and
resumes an interrupted run from its checkpoint (a finished workdir is read back, not retrained).

    python experiments/routers/compare.py                  # ~30 min on 2 CPU cores
    python experiments/routers/compare.py --seeds 0,1,2    # more seeds
    python experiments/routers/compare.py --only topk,expert   # names containing either
    python experiments/routers/compare.py --report_only    # table and plots of results.csv
    python experiments/routers/compare.py --budget tiny    # seconds: for trying the script
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
from typing import Callable, Iterable, Sequence

# The micro-batch variant needs several devices; on the CPU they are simulated, which must be
# set before jax is first imported.
NUM_DEVICES = 8
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count={NUM_DEVICES}"

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
HERE = os.path.dirname(os.path.abspath(__file__))

import numpy as np  # noqa: E402

from moejax.config import load_config_file, set_fields  # noqa: E402
from moejax.sweep_results import append_row, finished_names  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Variant:
  """One arm of the comparison: a router and the config fields it changes."""
  name: str
  router: str
  overrides: tuple[tuple[str, object], ...] = ()
  note: str = ""
  top1: bool = False   # one expert per token, twice as wide (same active FLOPs as top-2)


VARIANTS = (
    Variant("topk", "topk", note="softmax top-2, aux loss over the global batch"),
    Variant("topk_lossfree", "topk",
            (("model.moe.bias_update_rate", 1e-3), ("model.moe.lb_loss_weight", 0.0)),
            note="loss-free balancing (u=1e-3), no aux loss"),
    Variant("topk_micro", "topk", (("model.moe.lb_loss_scope", "micro_batch"),),
            note="aux loss per device micro-batch (2 sequences)"),
    Variant("sigmoid", "sigmoid"),
    Variant("switch", "switch", top1=True, note="top-1, experts 2x wide"),
    Variant("expert_choice", "expert_choice", note="C = T K / E"),
    Variant("hash", "hash"),
    Variant("base", "base", top1=True, note="top-1 (balanced assignment), experts 2x wide"),
    Variant("deepseek", "deepseek",
            (("model.moe.router_args.num_groups", 4), ("model.moe.router_args.topk_groups", 2),
             ("model.moe.bias_update_rate", 1e-3), ("model.moe.lb_loss_scope", "sequence"),
             ("model.moe.lb_loss_weight", 1e-4)),
            note="DeepSeek-V3 recipe: 2 of 4 groups, loss-free bias, sequence-wise loss 1e-4"),
    Variant("relu", "relu"),
    Variant("top_p", "top_p"),
    Variant("cosine", "cosine"),
    Variant("thor", "thor"),
    Variant("random", "random"),
)


@dataclasses.dataclass(frozen=True)
class Budget:
  """Steps per run and config fields set on every run."""
  steps: int
  overrides: tuple[tuple[str, object], ...] = ()


BUDGETS = {
    # About 30 minutes for the 14 variants on 2 shared CPU cores (README, "Timing").
    "default": Budget(steps=700, overrides=(("mesh.data", NUM_DEVICES),)),
    # Seconds per run (mostly compilation): for tests, the notebook and trying the script.
    "tiny": Budget(steps=60, overrides=(
        ("model.d_model", 32), ("model.num_layers", 1), ("model.num_heads", 2),
        ("model.num_kv_heads", 2), ("model.d_ff", 64), ("model.vocab_size", 32),
        ("model.max_len", 16), ("train.batch_size", 8), ("train.seq_len", 16),
        ("train.eval_batches", 2), ("data.num_domains", 4), ("data.branching", 2),
        ("mesh.data", 2))),
}

# Columns of results.csv. Curves are ';'-joined so the file alone makes the report.
COLUMNS = ("name", "variant", "router", "seed", "steps", "tokens", "eval_loss", "train_loss",
           "loss_floor", "bayes_loss", "gap_floor", "gap_bayes", "max_vio", "dropped_frac",
           "experts_per_token", "tokens_per_s", "mi_mean", "mi_max", "mi_layers", "eval_steps",
           "eval_curve", "wall_s")


def run_name(variant: Variant, seed: int) -> str:
  return f"{variant.name}_s{seed}"


def run_config(variant: Variant, seed: int, budget: Budget):
  """configs/default.py with the budget's fields, the variant's router and fields, `seed`."""
  c = load_config_file(os.path.join(ROOT, "configs", "default.py"))
  steps = budget.steps
  set_fields(c, {"seed": seed, "model.moe.router": variant.router, "train.steps": steps,
                 "train.warmup_steps": max(1, steps // 10),
                 "train.eval_every": max(1, steps // 10),
                 "train.log_every": max(1, steps // 20), "train.checkpoint_every": steps,
                 "train.keep_checkpoints": 1})
  set_fields(c, budget.overrides)
  if variant.top1:
    set_fields(c, {"model.moe.top_k": 1, "model.d_ff": 2 * c.model.d_ff})
  return set_fields(c, variant.overrides)


def why_skipped(variant: Variant, config) -> str | None:
  """Why `variant` cannot run here (its router is not registered, a field it sets does not
  exist yet, or the config does not validate), or None."""
  from moejax.config import validate  # noqa: PLC0415
  from moejax.moe.routing import ROUTERS  # noqa: PLC0415
  if variant.router not in ROUTERS:
    return f"router {variant.router!r} is not registered yet (registered: {sorted(ROUTERS)})"
  default = load_config_file(os.path.join(ROOT, "configs", "default.py"))
  for name, _ in variant.overrides:
    if name.startswith("model.moe.router_args."):
      continue   # the router's own keyword arguments: validate() checks them below
    node = default
    for part in name.split("."):
      if part not in node:
        return f"config field {name} does not exist yet"
      node = node[part]
  try:
    validate(config)
  except ValueError as e:
    return f"config does not validate: {e}"
  return None


def _last_quarter_mean(series: dict, metric: str, steps: int) -> float:
  from moejax.plot import layer_mean  # noqa: PLC0415
  mean = layer_mean(series, metric)
  if mean is None:
    return math.nan
  keep = mean[0] > 0.75 * steps
  return float(np.mean(mean[1][keep])) if keep.any() else float(mean[1][-1])


def _restore_model(config, workdir: str):
  """The trained Transformer of `workdir` (its latest checkpoint)."""
  from flax import nnx  # noqa: PLC0415
  from moejax import checkpoint  # noqa: PLC0415
  from moejax.train import Trainer  # noqa: PLC0415
  trainer = Trainer(config)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 keep=config.train.keep_checkpoints,
                                 every=config.train.checkpoint_every)
  _, state, _ = ckpt.restore(abstract_state=trainer.abstract_state())
  ckpt.close()
  return nnx.merge(trainer.graphdef, state["params"])


DOMAIN_COUNTS = "domain_counts.json"


def mutual_information(config, workdir: str) -> list[float]:
  """I(expert; domain) per MoE layer of the trained model on the held-out batches; the
  [E, M] (expert, domain) copy counts per layer go to `workdir/domain_counts.json`."""
  from moejax.data import make_source  # noqa: PLC0415
  from moejax.moe.analysis import (layer_domain_counts,  # noqa: PLC0415
                                   mutual_information_of_counts)
  source = make_source(config, "eval")
  batches = [source.next() for _ in range(config.train.eval_batches)]
  model = _restore_model(config, workdir)
  counts = layer_domain_counts(model, batches, config.data.num_domains)
  with open(os.path.join(workdir, DOMAIN_COUNTS), "w") as f:
    json.dump({name: c.tolist() for name, c in counts.items()}, f)
  return [mutual_information_of_counts(c) for c in counts.values()]


def _config_of(workdir: str):
  """The config a run was trained with (`workdir/config.json`, which `train_and_evaluate` writes at a run's first start)."""
  import ml_collections  # noqa: PLC0415
  with open(os.path.join(workdir, "config.json")) as f:
    return ml_collections.ConfigDict(json.load(f))


def run_row(variant: Variant, seed: int, config, workdir: str, wall_s: float) -> dict:
  """The results row of a finished run, read back from its metrics.jsonl and checkpoint."""
  from moejax.plot import read_series  # noqa: PLC0415
  series = read_series(workdir)
  steps = config.train.steps
  eval_steps, eval_curve = series["eval/loss"]
  floor = float(series["data/loss_floor"][1][0]) if "data/loss_floor" in series else math.nan
  bayes = float(series["data/bayes_loss"][1][0]) if "data/bayes_loss" in series else math.nan
  rates = series.get("train/tokens_per_s", (None, np.array([math.nan])))[1]
  mi = mutual_information(config, workdir)
  loss = float(eval_curve[-1])
  return {"name": run_name(variant, seed), "variant": variant.name, "router": variant.router,
          "seed": seed, "steps": steps,
          "tokens": steps * config.train.batch_size * config.train.seq_len,
          "eval_loss": loss, "train_loss": float(series["train/loss"][1][-1]),
          "loss_floor": floor, "bayes_loss": bayes, "gap_floor": loss - floor,
          "gap_bayes": loss - bayes,
          "max_vio": _last_quarter_mean(series, "max_vio", steps),
          "dropped_frac": _last_quarter_mean(series, "dropped_frac", steps),
          "experts_per_token": _last_quarter_mean(series, "experts_per_token", steps),
          "tokens_per_s": float(np.median(rates[1:] if len(rates) > 1 else rates)),
          "mi_mean": float(np.mean(mi)) if mi else math.nan,
          "mi_max": float(np.max(mi)) if mi else math.nan,
          "mi_layers": ";".join(f"{v:.4f}" for v in mi),
          "eval_steps": ";".join(str(int(s)) for s in eval_steps),
          "eval_curve": ";".join(f"{v:.5f}" for v in eval_curve),
          "wall_s": round(wall_s, 1)}


def run_all(results_path: str, runs_dir: str, *, budget: Budget, seeds: Sequence[int],
            variants: Sequence[Variant] = VARIANTS, only: str | None = None,
            train_fn: Callable | None = None, log: Callable[[str], None] = print) -> list[dict]:
  """Trains every (variant, seed) not yet in `results_path`, appending a row after each; returns
  the rows added. A run stopped early (SIGTERM) appends nothing and ends the sweep; running
  again resumes it."""
  if train_fn is None:
    from moejax.train import train_and_evaluate  # noqa: PLC0415
    train_fn = lambda config, workdir: train_and_evaluate(config, workdir, progress=False)
  os.makedirs(os.path.dirname(os.path.abspath(results_path)), exist_ok=True)
  done = finished_names(results_path)
  wanted = [w for w in (only or "").split(",") if w]
  todo = [(v, s) for s in seeds for v in variants
          if run_name(v, s) not in done and (not wanted or any(w in v.name for w in wanted))]
  log(f"{len(done)} runs already in {results_path}; {len(todo)} to do")
  added = []
  for i, (variant, seed) in enumerate(todo):
    config = run_config(variant, seed, budget)
    reason = why_skipped(variant, config)
    if reason:
      log(f"skip {run_name(variant, seed)}: {reason}")
      continue
    workdir = os.path.join(runs_dir, run_name(variant, seed))
    os.makedirs(workdir, exist_ok=True)
    tic = time.perf_counter()
    summary = train_fn(config, workdir)
    if summary.get("stopped_early"):
      log(f"{run_name(variant, seed)}: stopped at step {summary.get('step')}; rerun to resume")
      break
    row = run_row(variant, seed, config, workdir, time.perf_counter() - tic)
    append_row(results_path, row, COLUMNS)
    added.append(row)
    log(f"[{i + 1}/{len(todo)}] {row['name']}: eval {row['eval_loss']:.4f} (Bayes "
        f"+{row['gap_bayes']:.4f})  MaxVio {row['max_vio']:.3f}  MI {row['mi_mean']:.3f}  "
        f"{row['wall_s']:.0f} s")
  return added


# ---------------------------------------------------------------------------------------------
# Report: table, findings, plots.

def read_results(results_path: str) -> list[dict]:
  """The rows of results.csv with numbers parsed (curves as arrays)."""
  with open(results_path, newline="") as f:
    rows = list(csv.DictReader(f))
  out = []
  for r in rows:
    row = dict(r)
    for k in COLUMNS:
      if k in ("name", "variant", "router", "mi_layers", "eval_steps", "eval_curve"):
        continue
      row[k] = float(r[k]) if r[k] not in ("", None) else math.nan
    row["eval_steps"] = np.array([float(x) for x in r["eval_steps"].split(";")])
    row["eval_curve"] = np.array([float(x) for x in r["eval_curve"].split(";")])
    out.append(row)
  return out


def steps_to_reach(steps: np.ndarray, curve: np.ndarray, target: float) -> float:
  """First step at which the eval-loss curve reaches `target` (linear between eval points);
  NaN when it never does."""
  below = np.nonzero(curve <= target)[0]
  if not len(below):
    return math.nan
  i = below[0]
  if i == 0:
    return float(steps[0])
  s0, s1, l0, l1 = steps[i - 1], steps[i], curve[i - 1], curve[i]
  return float(s0 + (s1 - s0) * (l0 - target) / (l0 - l1))


def by_variant(rows: list[dict], variants: Sequence[Variant] = VARIANTS
               ) -> dict[str, list[dict]]:
  """Rows grouped by variant, in `variants` order (unknown variants last)."""
  order = {v.name: i for i, v in enumerate(variants)}
  groups: dict[str, list[dict]] = {}
  for r in sorted(rows, key=lambda r: (order.get(r["variant"], len(order)), r["seed"])):
    groups.setdefault(r["variant"], []).append(r)
  return groups


def _mean_std(rows: list[dict], key: str) -> tuple[float, float]:
  vals = np.array([r[key] for r in rows], np.float64)
  return float(np.mean(vals)), float(np.std(vals)) if len(vals) > 1 else math.nan


def speedups_per_seed(rows: list[dict], reference: str = "topk") -> dict[str, list[float]]:
  """Per variant, per seed: the reference's steps / this run's steps to reach the same seed's
  reference final eval loss (NaN: never reached)."""
  ref = {r["seed"]: r for r in rows if r["variant"] == reference}
  out: dict[str, list[float]] = {}
  for r in rows:
    if r["seed"] not in ref:
      continue
    base = ref[r["seed"]]
    reached = steps_to_reach(r["eval_steps"], r["eval_curve"], base["eval_curve"][-1])
    out.setdefault(r["variant"], []).append(base["steps"] / reached)
  return out


def speedups(rows: list[dict], reference: str = "topk") -> dict[str, float]:
  """Per variant: `speedups_per_seed` averaged over seeds (NaN if a seed never reached it)."""
  return {k: float(np.mean(v)) for k, v in speedups_per_seed(rows, reference).items()}


def findings(rows: list[dict]) -> list[str]:
  """The three seed findings of issue 11, each with the numbers and a verdict."""
  g = by_variant(rows)
  lines = []

  def mean(variant, key):
    return _mean_std(g[variant], key)[0]

  def per_seed(a, b, key, fmt="{:+.4f}"):
    """' [per seed: s0 a - b, s1 ...]' over the seeds both variants ran (several)."""
    diffs = _paired(g[a], g[b], key)
    if len(diffs) < 2:
      return ""
    return " [per seed: " + ", ".join(f"s{s} " + fmt.format(d) for s, d in diffs) + "]"

  speed = speedups(rows)
  speed_seeds = speedups_per_seed(rows)
  if "expert_choice" in g and "topk" in g:
    s = speed.get("expert_choice", math.nan)
    verdict = ("agrees, as strongly as reported (>= 2x)" if s >= 2 else
               "agrees in direction, weaker than the reported >2x" if s > 1.1 else
               "no clear difference (within 10%)" if s >= 0.9 else
               "does not agree: expert choice is slower" if s < 0.9 else
               "does not agree: expert choice never reached top-k's final loss")
    lines.append(
        f"1. Expert choice converges faster than top-k (Zhou et al. 2022, arXiv:2202.09368: "
        f">2x). Steps to top-k's final eval loss ({mean('topk', 'eval_loss'):.4f}): top-k "
        f"{mean('topk', 'steps'):.0f}, expert choice "
        f"{mean('topk', 'steps') / s if s == s and s > 0 else math.nan:.0f} (speed-up "
        f"{s:.2f}x{_seed_list(speed_seeds.get('expert_choice', []))}); final eval loss "
        f"{mean('expert_choice', 'eval_loss'):.4f} vs "
        f"{mean('topk', 'eval_loss'):.4f}"
        f"{per_seed('expert_choice', 'topk', 'eval_loss')}. Verdict: {verdict}.")
  else:
    lines.append("1. Expert choice vs top-k: no expert_choice and topk rows in the results.")
  if "topk_lossfree" in g and "topk" in g:
    dv = mean("topk_lossfree", "max_vio") - mean("topk", "max_vio")
    dl = mean("topk_lossfree", "eval_loss") - mean("topk", "eval_loss")
    # Seed-to-seed spread when there are several seeds; at least 0.005 nats.
    noise = max(_spread(g["topk"], "eval_loss"), _spread(g["topk_lossfree"], "eval_loss"), 0.005)
    if dv < 0 and dl <= noise:
      verdict = "agrees" + (" (loss also better)" if dl < -noise else " (loss equal within noise)")
    elif dv < 0:
      verdict = "half: better MaxVio, but worse loss"
    else:
      verdict = "does not agree: MaxVio is not better"
    lines.append(
        f"2. Loss-free balancing reaches better MaxVio at equal or better loss than the auxiliary "
        f"loss (Wang et al. 2024, arXiv:2408.15664). MaxVio {mean('topk_lossfree', 'max_vio'):.3f}"
        f" vs {mean('topk', 'max_vio'):.3f}"
        f"{per_seed('topk_lossfree', 'topk', 'max_vio', '{:+.3f}')}"
        f"; eval loss {mean('topk_lossfree', 'eval_loss'):.4f} "
        f"vs {mean('topk', 'eval_loss'):.4f} (difference {dl:+.4f}"
        f"{per_seed('topk_lossfree', 'topk', 'eval_loss')}; noise allowance {noise:.4f}, the "
        f"larger seed spread or 0.005). Verdict: {verdict}.")
  else:
    lines.append("2. Loss-free balancing: no topk_lossfree and topk rows in the results.")
  if "topk_micro" in g and "topk" in g:
    mg, mm = mean("topk", "mi_mean"), mean("topk_micro", "mi_mean")
    ratio = mg / mm if mm > 0 else math.inf
    verdict = (f"agrees strongly ({ratio:.2f}x the mutual information)" if ratio >= 1.5 else
               f"agrees ({ratio:.2f}x the mutual information)" if ratio >= 1.1 else
               f"no clear difference ({ratio:.2f}x, within 10%)" if ratio > 0.9 else
               f"does not agree ({ratio:.2f}x the mutual information)")
    lines.append(
        f"3. Global-batch balancing gives more domain specialisation than micro-batch balancing "
        f"(Qiu et al. 2025, arXiv:2501.11873). I(expert; domain), mean over layers: global "
        f"{mg:.4f} nats, micro-batch {mm:.4f} nats"
        f"{per_seed('topk', 'topk_micro', 'mi_mean', '{:+.3f}')} (max over layers "
        f"{mean('topk', 'mi_max'):.4f} vs {mean('topk_micro', 'mi_max'):.4f}); eval loss "
        f"{mean('topk', 'eval_loss'):.4f} vs {mean('topk_micro', 'eval_loss'):.4f}. "
        f"Verdict: {verdict}.")
  else:
    lines.append("3. Global vs micro-batch balancing: no topk_micro and topk rows in the results.")
  return lines


def _seed_list(values: list[float]) -> str:
  return "" if len(values) < 2 else " [per seed: " + ", ".join(f"{v:.2f}x" for v in values) + "]"


def _paired(a: list[dict], b: list[dict], key: str) -> list[tuple[int, float]]:
  """[(seed, a[key] - b[key])] over the seeds present in both row lists."""
  other = {int(r["seed"]): r[key] for r in b}
  return [(int(r["seed"]), r[key] - other[int(r["seed"])]) for r in a if int(r["seed"]) in other]


def _spread(rows: list[dict], key: str) -> float:
  _, std = _mean_std(rows, key)
  return 0.0 if std != std else std


TABLE = (("eval loss", "eval_loss", "{:.4f}"), ("- floor", "gap_floor", "{:.4f}"),
         ("- Bayes", "gap_bayes", "{:.4f}"), ("MaxVio", "max_vio", "{:.3f}"),
         ("dropped", "dropped_frac", "{:.3f}"), ("experts/token", "experts_per_token", "{:.2f}"),
         ("tokens/s", "tokens_per_s", "{:,.0f}"), ("MI mean", "mi_mean", "{:.3f}"),
         ("MI max", "mi_max", "{:.3f}"))


def markdown_table(rows: list[dict], variants: Sequence[Variant] = VARIANTS) -> str:
  """One line per variant: means over seeds (± std with several seeds), and the speed-up to
  top-k's final loss."""
  per_seed = speedups_per_seed(rows)
  notes = {v.name: v.note for v in variants}
  head = ["variant", "router", "seeds"] + [t[0] for t in TABLE] + ["speed-up vs top-k", "note"]
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for name, group in by_variant(rows, variants).items():
    cells = [name, group[0]["router"], str(len(group))]
    for _, key, fmt in TABLE:
      m, s = _mean_std(group, key)
      cells.append(fmt.format(m) + ("" if s != s else " ± " + fmt.format(s)))
    per = np.array(per_seed.get(name, [math.nan]))
    reached = per[per == per]
    cells.append("never" if not len(reached) else
                 f"{reached.mean():.2f}x" + ("" if len(reached) == len(per) else
                                             f" ({len(reached)}/{len(per)} seeds)"))
    cells.append(notes.get(name, ""))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_bars(rows: list[dict], path: str, variants: Sequence[Variant] = VARIANTS,
              title: str = "router comparison") -> str:
  """Bar chart per metric (means over seeds, std as error bars with several seeds)."""
  from moejax.plot import plt  # noqa: PLC0415  (Agg backend)
  groups = by_variant(rows, variants)
  names = list(groups)
  panels = (("eval loss - Bayes loss", "gap_bayes"), ("MaxVio", "max_vio"),
            ("dropped fraction", "dropped_frac"), ("experts per token", "experts_per_token"),
            ("train tokens/s", "tokens_per_s"), ("I(expert; domain), nats", "mi_mean"))
  fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
  for ax, (title, key) in zip(axes.ravel(), panels):
    stats = [_mean_std(groups[n], key) for n in names]
    means = [m for m, _ in stats]
    errs = [0.0 if s != s else s for _, s in stats]
    colors = ["C3" if n == "topk" else "C0" for n in names]
    ax.bar(range(len(names)), means, yerr=errs if any(errs) else None, color=colors, capsize=2)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
  seeds = sorted({int(r["seed"]) for r in rows})
  fig.suptitle(f"{title}, {int(rows[0]['steps'])} steps, seeds {seeds}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


SPECIALISATION_VARIANTS = ("topk", "topk_micro", "topk_lossfree", "expert_choice")


def plot_expert_domain(workdirs: dict[str, str], path: str) -> str | None:
  """p(expert | domain) per MoE layer (columns) for each run (rows) that saved its counts: how
  each domain spreads its token copies over the experts. None when no run saved counts."""
  from moejax.moe.analysis import mutual_information_of_counts  # noqa: PLC0415
  from moejax.plot import plt  # noqa: PLC0415
  tables = {}
  for name, workdir in workdirs.items():
    p = os.path.join(workdir, DOMAIN_COUNTS)
    if not os.path.exists(p) and os.path.exists(os.path.join(workdir, "config.json")):
      mutual_information(_config_of(workdir), workdir)   # a run from before counts were saved
    if os.path.exists(p):
      with open(p) as f:
        tables[name] = {layer: np.asarray(c) for layer, c in json.load(f).items()}
  if not tables:
    return None
  layers = max(len(t) for t in tables.values())
  cond = {name: {layer: c / np.maximum(c.sum(axis=0, keepdims=True), 1.0)
                 for layer, c in table.items()} for name, table in tables.items()}
  vmax = max(float(p.max()) for t in cond.values() for p in t.values())
  fig, axes = plt.subplots(len(tables), layers, figsize=(2.6 * layers + 1, 2.4 * len(tables)),
                           squeeze=False, layout="constrained")
  for row, (name, table) in zip(axes, tables.items()):
    for ax, (layer, counts) in zip(row, table.items()):
      image = ax.imshow(cond[name][layer], cmap="magma", vmin=0.0, vmax=vmax, aspect="auto")
      ax.set_title(f"{name} {layer}\nI = {mutual_information_of_counts(counts):.3f} nats",
                   fontsize=8)
      ax.set_xlabel("domain", fontsize=8)
      ax.set_ylabel("expert", fontsize=8)
      ax.tick_params(labelsize=7)
  fig.colorbar(image, ax=axes.ravel().tolist(), label="p(expert | domain)")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def write_report(results_path: str, out_dir: str, runs_dir: str) -> list[str]:
  """results.md (table and findings), bars.png, and moejax.plot's overlays of the first seed's
  runs in `out_dir/plots`; returns the paths written."""
  from moejax.plot import plot_runs  # noqa: PLC0415
  rows = read_results(results_path)
  md = os.path.join(out_dir, "results.md")
  first_seed = min(int(r["seed"]) for r in rows)
  with open(md, "w") as f:
    f.write(f"# Router comparison (issue 11)\n\nWritten by `experiments/routers/compare.py` from "
            f"`{os.path.basename(results_path)}`; {int(rows[0]['steps'])} steps of "
            f"{int(rows[0]['tokens'] / rows[0]['steps'])} tokens per run. Means over seeds; "
            "MaxVio, dropped and experts/token over the last quarter of training; speed-up: "
            "top-k's steps / this run's steps to top-k's final eval loss.\n\n")
    f.write(markdown_table(rows) + "\n\n## Seed findings\n\n")
    f.write("\n".join(findings(rows)) + "\n")
  paths = [md]
  os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)
  paths.append(plot_bars(rows, os.path.join(out_dir, "plots", "bars.png")))
  workdirs = [os.path.join(runs_dir, r["name"]) for r in rows if int(r["seed"]) == first_seed]
  workdirs = [w for w in workdirs if os.path.exists(os.path.join(w, "metrics.jsonl"))]
  if workdirs:
    paths += plot_runs(workdirs, os.path.join(out_dir, "plots"))
  special = {v: os.path.join(runs_dir, f"{v}_s{first_seed}") for v in SPECIALISATION_VARIANTS}
  heatmap = plot_expert_domain(special, os.path.join(out_dir, "plots", "expert_domain.png"))
  return paths + ([heatmap] if heatmap else [])


def cli(argv: Iterable[str] | None, *, description: str, variants: Sequence[Variant],
        budgets: dict, report: Callable, findings_of: Callable, here: str) -> int:
  """The command line of a comparison (this one and experiments/variants/compare.py): train
  the variants not yet in `here/results.csv`, then `report(results_path, results_dir,
  runs_dir)` and print `findings_of(rows)`."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--budget", default="default", choices=sorted(budgets))
  p.add_argument("--seeds", default="0", help="comma-separated model seeds")
  p.add_argument("--only", default=None,
                 help="train only variants whose name contains one of these (comma-separated)")
  p.add_argument("--results_dir", default=here, help="results.csv, results.md, plots/")
  p.add_argument("--runs_dir", default=os.path.join(here, "runs"),
                 help="one workdir per run (not committed)")
  p.add_argument("--report_only", action="store_true", help="skip training; write the report")
  args = p.parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  results_path = os.path.join(args.results_dir, "results.csv")
  if not args.report_only:
    tic = time.perf_counter()
    run_all(results_path, args.runs_dir, budget=budgets[args.budget], seeds=seeds,
            variants=variants, only=args.only)
    print(f"wall time this invocation: {time.perf_counter() - tic:.0f} s")
  if not os.path.exists(results_path):
    print(f"no results in {results_path}")
    return 1
  for path in report(results_path, args.results_dir, args.runs_dir):
    print(path)
  print("\n".join(findings_of(read_results(results_path))))
  return 0


def main(argv: Iterable[str] | None = None) -> int:
  return cli(argv, description=__doc__.split("\n")[0], variants=VARIANTS, budgets=BUDGETS,
             report=write_report, findings_of=findings, here=HERE)


if __name__ == "__main__":
  sys.exit(main())
