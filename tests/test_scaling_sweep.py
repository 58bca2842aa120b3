"""experiments/scaling/sweep.py: rows are appended once per finished run with the accounting's
numbers, a restart trains nothing already done, an interrupted run resumes to the same loss as an
uninterrupted one, and the fit recovers a known fine-grained law from a results table."""
import csv
import importlib.util
import json
import os
import sys

import numpy as np
import pytest

from moejax.scaling import get_law
from moejax.scaling.accounting import flops_per_token, param_counts
from moejax.train import train_and_evaluate

from helpers import ROOT


def _load_sweep():
  path = os.path.join(ROOT, "experiments", "scaling", "sweep.py")
  spec = importlib.util.spec_from_file_location("moejax_scaling_sweep", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module   # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


sweep = _load_sweep()
GRID = sweep.GRIDS["tiny"]
BACKEND = "ragged_dot"


class CountingTrainer:
  """train_and_evaluate, counting calls; stops the first `interrupt` calls at step 3."""

  def __init__(self, interrupt: int = 0):
    self.calls, self.interrupt = [], interrupt

  def __call__(self, config, workdir):
    self.calls.append(os.path.basename(workdir))
    stop = 3 if len(self.calls) <= self.interrupt else None
    return train_and_evaluate(config, workdir, progress=False, stop_after=stop)


def _rows(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
  """The tiny grid, trained once without interruption."""
  root = tmp_path_factory.mktemp("sweep")
  results = str(root / "sweep.csv")
  trainer = CountingTrainer()
  added = sweep.run_grid(GRID, results, str(root / "runs"), gmm_backend=BACKEND,
                         train_fn=trainer, log=lambda s: None)
  return results, root, trainer, added


def test_each_finished_run_appends_one_row_with_its_accounting(finished_sweep):
  results, _, trainer, added = finished_sweep
  runs = sweep.grid_runs(GRID)
  assert trainer.calls == [r.name for r in runs]
  rows = _rows(results)
  assert [r["name"] for r in rows] == [r.name for r in runs] == [a["name"] for a in added]
  for run, row in zip(runs, rows):
    config = sweep.run_config(run, GRID, BACKEND)
    counts = param_counts(config)
    tokens = run.steps * config.train.batch_size * config.train.seq_len
    fpt = flops_per_token(config, causal=True).exact
    assert int(row["D"]) == tokens
    assert int(row["N_active_nonemb"]) == counts.active_non_embedding
    assert int(row["N_total_nonemb"]) == counts.total_non_embedding
    assert float(row["C"]) == pytest.approx(fpt * tokens, rel=1e-12)
    # A trained model beats the uniform guess, and cannot beat the Bayes-optimal predictor by
    # more than eval noise.
    assert float(row["bayes_loss"]) - 0.2 < float(row["loss"]) < np.log(config.model.vocab_size)
  moe = [r for r in rows if r["ffn"] != "dense"][0]
  assert (int(moe["num_experts"]), int(moe["top_k"]), int(moe["G"])) == (8, 2, 2)
  assert int(moe["N_total_nonemb"]) > int(moe["N_active_nonemb"])


def test_restart_skips_finished_runs(finished_sweep):
  results, root, _, _ = finished_sweep
  before = open(results).read()
  trainer = CountingTrainer()
  added = sweep.run_grid(GRID, results, str(root / "runs"), gmm_backend=BACKEND,
                         train_fn=trainer, log=lambda s: None)
  assert trainer.calls == [] and added == []
  assert open(results).read() == before


def test_interrupted_run_appends_nothing_then_resumes_to_the_same_loss(finished_sweep, tmp_path):
  reference = {r["name"]: float(r["loss"]) for r in _rows(finished_sweep[0])}
  results, runs = str(tmp_path / "sweep.csv"), str(tmp_path / "runs")
  trainer = CountingTrainer(interrupt=1)
  added = sweep.run_grid(GRID, results, runs, gmm_backend=BACKEND, only="dense",
                         train_fn=trainer, log=lambda s: None)
  assert added == [] and not os.path.exists(results)
  added = sweep.run_grid(GRID, results, runs, gmm_backend=BACKEND, only="dense",
                         train_fn=CountingTrainer(), log=lambda s: None)
  (row,) = added
  assert row["loss"] == reference[row["name"]]


def test_fit_recovers_a_known_fine_grained_law(tmp_path):
  """A results table whose losses come from known parameters (plus 0.2% noise): `--fit_only`
  must recover them and write the fit and the plot."""
  law = get_law("fine_grained")
  truth = {"a": 20.0, "alpha": 0.3, "b": 40.0, "beta": 0.25, "g": 8.0, "gamma": 0.6, "c": 1.1}
  rng = np.random.default_rng(0)
  n = np.repeat([2e4, 7e4, 1.7e5], 9)
  d = np.tile(np.repeat([2.5e5, 5e5, 1e6], 3), 3)
  g = np.tile([1.0, 2.0, 4.0], 9)
  loss = law.loss(truth, N=n, D=d, G=g) * np.exp(rng.normal(0, 0.002, n.shape))
  rows = [{k: 0 for k in sweep.COLUMNS} for _ in n]
  for i, row in enumerate(rows):
    row.update(name=f"r{i}", size=f"n{int(n[i])}", ffn=f"g{int(g[i])}", G=int(g[i]),
               D=int(d[i]), N_total_nonemb=int(n[i]), C=6 * n[i] * d[i], loss=float(loss[i]),
               bayes_loss=1.1, loss_floor=1.05)
    sweep.append_row(str(tmp_path / "sweep.csv"), row)
  assert sweep.main(["--fit_only", "--results_dir", str(tmp_path), "--bootstrap", "0"]) == 0
  summary = json.load(open(tmp_path / "fine_grained_fit.json"))
  fitted = summary["params"]
  # The fit explains the data at least as well as the true parameters do, and its predictions
  # match the noiseless law. (With 27 points over one decade of N and D, c trades off against
  # a and b, so single parameters are identified only loosely.)
  truth_rmse = np.sqrt(np.mean((np.log(law.loss(truth, N=n, D=d, G=g)) - np.log(loss)) ** 2))
  assert summary["rmse_log"] <= truth_rmse * 1.01
  np.testing.assert_allclose(law.loss(fitted, N=n, D=d, G=g), law.loss(truth, N=n, D=d, G=g),
                             rtol=4e-3)
  assert fitted["gamma"] == pytest.approx(truth["gamma"], rel=0.2)
  assert os.path.getsize(tmp_path / "loss_vs_compute.png") > 10_000
