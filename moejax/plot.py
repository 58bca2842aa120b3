"""Plots of training runs from their `WORKDIR/metrics.jsonl` (matplotlib, Agg backend, PNG).

    python -m moejax.plot WORKDIR [WORKDIR ...] --out DIR [--tokens_per_step N]

writes into DIR:
- `loss.png`: train and eval loss against steps and against training tokens, with the data's
  loss floor (entropy rate) and Bayes loss as horizontal lines;
- `balance.png`: MaxVio (max load / mean load - 1; "Auxiliary-Loss-Free Load Balancing
  Strategy for Mixture-of-Experts", Wang et al. 2024, arXiv:2408.15664) and the dropped fraction
  of token copies over training, mean over the MoE layers (and experts per token when logged);
- `load_<run>.png`: per run, a heatmap of each MoE layer's expert load over training (one panel
  per layer; x step, y expert; colour the expert's share of the routed copies).
Several workdirs are overlaid in `loss.png` and `balance.png`, labelled with their basenames.

Reading is apart from drawing: `read_series` turns a metrics.jsonl into {name: (steps, values)}
arrays and `read_run` gathers what the plots need, so tests compare the plotted numbers with a
hand-written file. Tokens per step come from `--tokens_per_step`, else from `WORKDIR/config.json`
(`train.batch_size * train.seq_len`), else from configs/default.py (a note is printed).

Not a paper implementation: analysis tooling (issue 11).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from typing import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moejax.metrics import METRICS_FILE, read_metrics  # noqa: E402

_LAYER = re.compile(r"^moe/(layer_(\d+))/(.+)$")
BALANCE_METRICS = ("max_vio", "dropped_frac", "experts_per_token")


def metrics_path(workdir: str | os.PathLike) -> str:
  """`workdir/metrics.jsonl`, or `workdir` itself when it names a file."""
  workdir = os.fspath(workdir)
  return workdir if os.path.isfile(workdir) else os.path.join(workdir, METRICS_FILE)


def read_series(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Every metric of a metrics.jsonl (or of `path/metrics.jsonl`) as arrays.

  Returns {name: (steps [n] int64, values [n, ...] float64)}, one entry per record holding the
  name, in file order; a per-expert `load` gives values [n, E].

  Raises:
    FileNotFoundError: no metrics file; the message names the path.
    ValueError: the file holds no record (empty, or only a line cut by a kill); names the path.
  """
  path = metrics_path(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"moejax.plot: {path}: no such file (is this a moejax workdir?)")
  records = read_metrics(path)
  if not records:
    raise ValueError(f"moejax.plot: {path}: no metrics records (empty file)")
  steps: dict[str, list[int]] = {}
  values: dict[str, list] = {}
  for record in records:
    for name, value in record.items():
      if name == "step":
        continue
      steps.setdefault(name, []).append(int(record["step"]))
      values.setdefault(name, []).append(value)
  return {name: (np.asarray(steps[name], np.int64), np.asarray(values[name], np.float64))
          for name in steps}


def layer_names(series: dict, metric: str) -> list[str]:
  """The MoE layers (`layer_<i>`, by i) that logged `metric` (`moe/layer_<i>/<metric>`)."""
  found = []
  for name in series:
    m = _LAYER.match(name)
    if m and m.group(3) == metric:
      found.append((int(m.group(2)), m.group(1)))
  return [layer for _, layer in sorted(found)]


def layer_mean(series: dict, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
  """(steps [n], mean over MoE layers of `metric` [n]) at the steps every layer logged it;
  None when no layer logged it."""
  layers = layer_names(series, metric)
  if not layers:
    return None
  per_layer = [series[f"moe/{layer}/{metric}"] for layer in layers]
  common = per_layer[0][0]
  for steps, _ in per_layer[1:]:
    common = np.intersect1d(common, steps)
  stacked = [vals[np.searchsorted(steps, common)] for steps, vals in per_layer]
  return common, np.mean(stacked, axis=0)


def _scalar(series: dict, name: str) -> float | None:
  if name not in series:
    return None
  return float(series[name][1][0])


@dataclasses.dataclass
class RunData:
  """What the plots draw for one workdir.

  Attributes:
    name: the label (the workdir's basename).
    series: `read_series` of its metrics.jsonl.
    tokens_per_step: tokens per train step (B*S), for the token axis.
    loss_floor, bayes_loss: `data/loss_floor`, `data/bayes_loss` (None when not logged).
  """
  name: str
  series: dict
  tokens_per_step: int
  loss_floor: float | None
  bayes_loss: float | None

  def get(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, values) of metric `name`, or None."""
    return self.series.get(name)

  def load(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps [n], load [n, E]) of MoE layer `layer` (e.g. "layer_0")."""
    return self.series[f"moe/{layer}/load"]


def tokens_per_step_of(workdir: str, default: int | None = None) -> int:
  """Tokens per train step of a run: `default` when given, else from `WORKDIR/config.json`
  (`train.batch_size * train.seq_len`), else from configs/default.py with a printed note."""
  if default is not None:
    return int(default)
  path = os.path.join(workdir, "config.json")
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      t = json.load(f)["train"]
    return int(t["batch_size"]) * int(t["seq_len"])
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  from moejax.config import load_config_file  # noqa: PLC0415
  t = load_config_file(os.path.join(here, "configs", "default.py")).train
  print(f"moejax.plot: {workdir}: no config.json; assuming configs/default.py's "
        f"{t.batch_size * t.seq_len} tokens per step (set --tokens_per_step)", file=sys.stderr)
  return t.batch_size * t.seq_len


def run_labels(workdirs: Sequence[str]) -> list[str]:
  """Labels of `workdirs`: their basenames, with the parent folder added where two agree."""
  paths = [os.path.normpath(os.path.abspath(os.fspath(w))) for w in workdirs]
  base = [os.path.basename(p) for p in paths]
  return [os.path.join(os.path.basename(os.path.dirname(p)), b) if base.count(b) > 1 else b
          for p, b in zip(paths, base)]


def read_run(workdir: str | os.PathLike, *, name: str | None = None,
             tokens_per_step: int | None = None) -> RunData:
  """`RunData` of one workdir (see `read_series` for the errors)."""
  workdir = os.fspath(workdir)
  series = read_series(workdir)
  return RunData(name=name or run_labels([workdir])[0], series=series,
                 tokens_per_step=tokens_per_step_of(workdir, tokens_per_step),
                 loss_floor=_scalar(series, "data/loss_floor"),
                 bayes_loss=_scalar(series, "data/bayes_loss"))


def _colors(n: int) -> list:
  if n <= 10:
    return [plt.get_cmap("tab10")(i) for i in range(n)]
  # tab20's dark shades first, then the light ones, so neighbours differ in hue.
  order = list(range(0, 20, 2)) + list(range(1, 20, 2))
  return [plt.get_cmap("tab20")(order[i % 20]) for i in range(n)]


def _reference_lines(ax, runs: Sequence[RunData]) -> None:
  """The loss floor (dashed) and Bayes loss (dotted) of the runs, one line per distinct value."""
  for attr, style, color, label in (("loss_floor", "--", "k", "loss floor"),
                                    ("bayes_loss", ":", "tab:red", "Bayes loss")):
    for value in sorted({round(getattr(r, attr), 6) for r in runs if getattr(r, attr) is not None}):
      ax.axhline(value, color=color, ls=style, lw=1.0, label=f"{label} {value:.4f}")


def plot_loss(runs: Sequence[RunData], path: str) -> str:
  """Train (line) and eval (markers) loss against steps (left) and tokens (right)."""
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), layout="constrained")
  for run, color in zip(runs, _colors(len(runs))):
    for ax, scale in zip(axes, (1, run.tokens_per_step)):
      train, evals = run.get("train/loss"), run.get("eval/loss")
      if train is not None:
        ax.plot(train[0] * scale, train[1], "-", color=color, lw=0.9, alpha=0.6,
                label=run.name if evals is None else None)
      if evals is not None:
        ax.plot(evals[0] * scale, evals[1], "o--", color=color, ms=3.5, lw=1.0, label=run.name)
  for ax, xlabel in zip(axes, ("step", "training tokens")):
    _reference_lines(ax, runs)
    ax.set(xlabel=xlabel, ylabel="loss (nats/token)")
    ax.grid(alpha=0.3)
  axes[0].set_title("loss against steps (line: train, markers: eval)")
  axes[1].set_title("loss against tokens")
  axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                 ncol=1 if len(runs) <= 14 else 2)
  _zoom_on_tail(axes, runs)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _zoom_on_tail(axes, runs: Sequence[RunData]) -> None:
  """y-limits that show the approach to the floor, not the first steps' ln(V)."""
  lows, highs = [], []
  for run in runs:
    for name in ("train/loss", "eval/loss"):
      s = run.get(name)
      if s is not None and len(s[1]):
        finite = s[1][np.isfinite(s[1])]
        if len(finite):
          lows.append(finite.min())
          highs.append(finite[len(finite) // 4:].max() if len(finite) > 3 else finite.max())
    for ref in (run.loss_floor, run.bayes_loss):
      if ref is not None:
        lows.append(ref)
  if lows and highs:
    lo, hi = min(lows), max(highs)
    pad = 0.05 * max(hi - lo, 1e-3)
    for ax in axes:
      ax.set_ylim(lo - pad, hi + pad)


def plot_balance(runs: Sequence[RunData], path: str) -> str:
  """MaxVio, dropped fraction (and experts per token when logged), mean over MoE layers."""
  metrics = [m for m in BALANCE_METRICS if any(layer_mean(r.series, m) for r in runs)] or [
      "max_vio", "dropped_frac"]
  fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.0), squeeze=False)
  for ax, metric in zip(axes[0], metrics):
    for run, color in zip(runs, _colors(len(runs))):
      mean = layer_mean(run.series, metric)
      if mean is not None:
        ax.plot(mean[0], mean[1], "-", color=color, lw=1.0, label=run.name)
    ax.set(xlabel="step", ylabel=f"{metric} (mean over MoE layers)", title=metric)
    ax.grid(alpha=0.3)
  if any(ax.get_lines() for ax in axes[0]):
    axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_load_heatmap(run: RunData, path: str) -> str | None:
  """One panel per MoE layer: x step, y expert, colour the expert's load (share of the routed
  copies; 1/E is balanced). None (nothing written) for a run without MoE layers."""
  layers = layer_names(run.series, "load")
  if not layers:
    return None
  loads = [run.load(layer) for layer in layers]
  vmax = max(float(np.max(v)) for _, v in loads)
  fig, axes = plt.subplots(1, len(layers), figsize=(3.4 * len(layers) + 1.2, 3.4), squeeze=False,
                           layout="constrained")
  for ax, layer, (steps, load) in zip(axes[0], layers, loads):
    num_experts = load.shape[1]
    # Cell edges halfway between logged steps, so uneven logging draws correctly.
    edges = _edges(steps)
    mesh = ax.pcolormesh(edges, np.arange(num_experts + 1) - 0.5, load.T, cmap="viridis",
                         vmin=0.0, vmax=vmax, shading="flat")
    ax.set(xlabel="step", ylabel="expert", title=f"{run.name} {layer}")
    ax.set_yticks(range(num_experts))
  fig.colorbar(mesh, ax=axes[0].tolist(), label="load (share of routed copies)")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _edges(steps: np.ndarray) -> np.ndarray:
  steps = np.asarray(steps, np.float64)
  if len(steps) == 1:
    return np.array([steps[0] - 0.5, steps[0] + 0.5])
  mid = (steps[1:] + steps[:-1]) / 2
  return np.concatenate([[2 * steps[0] - mid[0]], mid, [2 * steps[-1] - mid[-1]]])


def _file_name(label: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def plot_runs(workdirs: Iterable[str | os.PathLike], out: str, *,
              tokens_per_step: int | None = None) -> list[str]:
  """Writes every plot of `workdirs` into `out` (created); returns the paths written."""
  workdirs = [os.fspath(w) for w in workdirs]
  if not workdirs:
    raise ValueError("moejax.plot: give at least one WORKDIR")
  runs = [read_run(w, name=label, tokens_per_step=tokens_per_step)
          for w, label in zip(workdirs, run_labels(workdirs))]
  os.makedirs(out, exist_ok=True)
  paths = [plot_loss(runs, os.path.join(out, "loss.png")),
           plot_balance(runs, os.path.join(out, "balance.png"))]
  for run in runs:
    heatmap = plot_load_heatmap(run, os.path.join(out, f"load_{_file_name(run.name)}.png"))
    if heatmap:
      paths.append(heatmap)
  return paths


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m moejax.plot", description=__doc__.split("\n")[0])
  p.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="run directories (metrics.jsonl)")
  p.add_argument("--out", required=True, help="folder for the PNG files")
  p.add_argument("--tokens_per_step", type=int, default=None,
                 help="tokens per train step (default: WORKDIR/config.json or configs/default.py)")
  args = p.parse_args(argv)
  try:
    paths = plot_runs(args.workdirs, args.out, tokens_per_step=args.tokens_per_step)
  except (FileNotFoundError, ValueError) as e:
    print(e, file=sys.stderr)
    return 2
  for path in paths:
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
