"""The CLI: `fit` ends with one JSON line of the paper's parameter names and values recovered from
synthetic data; `optimal` prints Hoffmann et al.'s (2022, arXiv:2203.15556) closed form."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from moejax.scaling import get_law
from moejax.scaling.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRUTH = {"E": 1.8172, "A": 477.84, "B": 2143.86, "alpha": 0.3473, "beta": 0.3672}


def test_fit_prints_table_and_json(tmp_path, capsys):
  law = get_law("chinchilla")
  mesh = np.meshgrid(np.geomspace(5e7, 2e10, 7), np.geomspace(1e9, 1e12, 7), indexing="ij")
  n, d = mesh[0].ravel(), mesh[1].ravel()
  loss = law.loss(TRUTH, N=n, D=d) * np.exp(1e-3 * np.random.default_rng(0).standard_normal(n.size))
  path = tmp_path / "points.csv"
  with open(path, "w") as f:
    f.write("Model Size,Training FLOP,final loss\n")
    for row in zip(n, 6 * n * d, loss):
      f.write(",".join(repr(float(x)) for x in row) + "\n")
  plot = tmp_path / "fit.png"
  code = main(["fit", "--law", "chinchilla", "--data", str(path), "--column", 'N="Model Size"',
               "--column", 'D="Training FLOP"/(6*"Model Size")', "--column", 'loss="final loss"',
               "--starts", "150", "--bootstrap", "20", "--plot", str(plot)])
  out = capsys.readouterr().out.strip().splitlines()
  assert code == 0
  params = json.loads(out[-1])
  assert list(params) == ["E", "A", "B", "alpha", "beta"]
  for k in ("E", "alpha", "beta"):
    assert params[k] == pytest.approx(TRUTH[k], rel=0.05), (k, params)
  assert any("95% interval (20 bootstrap)" in line for line in out)
  assert plot.stat().st_size > 10_000


def test_fit_reports_a_bad_column_expression(tmp_path, capsys):
  path = tmp_path / "p.csv"
  path.write_text("x,loss\n1,2\n")
  code = main(["fit", "--law", "chinchilla", "--data", str(path), "--column", "N=__import__('os')"])
  assert code == 2
  assert "column expression" in capsys.readouterr().err


def test_optimal_module_entry_point():
  """`python -m moejax.scaling optimal` in a fresh interpreter: closed-form N*, D*."""
  out = subprocess.run(
      [sys.executable, "-m", "moejax.scaling", "optimal", "--law", "chinchilla", "--params",
       json.dumps(TRUTH), "--flops", "1e21"], cwd=REPO, capture_output=True, text=True, check=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  v = json.loads(out.stdout.strip().splitlines()[-1])
  a, b = TRUTH["alpha"], TRUTH["beta"]
  g = (a * TRUTH["A"] / (b * TRUTH["B"])) ** (1 / (a + b))
  assert v["N"] == pytest.approx(g * (1e21 / 6) ** (b / (a + b)), rel=1e-9)
  assert v["D"] == pytest.approx((1e21 / 6) ** (a / (a + b)) / g, rel=1e-9)
