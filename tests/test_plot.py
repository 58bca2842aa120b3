"""moejax.plot: the parsed arrays equal the numbers of a hand-written metrics.jsonl; the PNGs are
written, for one workdir and two overlaid; a missing or empty file is named in the error; the
end-of-run summary names the plot command."""
import json
import os

import numpy as np
import pytest

from moejax import plot
from moejax.metrics import format_summary

# Two MoE layers, three experts, logs at steps 10 and 20, evals at 20, data stats at step 0.
RECORDS = [
    {"step": 0, "data/loss_floor": 1.25, "data/bayes_loss": 1.5},
    {"step": 10, "train/loss": 3.0, "train/tokens_per_s": 100.0,
     "moe/layer_0/load": [0.5, 0.25, 0.25], "moe/layer_0/max_vio": 0.5,
     "moe/layer_0/dropped_frac": 0.0, "moe/layer_1/load": [0.2, 0.4, 0.4],
     "moe/layer_1/max_vio": 0.2, "moe/layer_1/dropped_frac": 0.1},
    {"step": 20, "train/loss": 2.0, "train/tokens_per_s": 120.0,
     "moe/layer_0/load": [0.4, 0.3, 0.3], "moe/layer_0/max_vio": 0.2,
     "moe/layer_0/dropped_frac": 0.05, "moe/layer_1/load": [1 / 3, 1 / 3, 1 / 3],
     "moe/layer_1/max_vio": 0.0, "moe/layer_1/dropped_frac": 0.0},
    {"step": 20, "eval/loss": 2.25},
]


def _workdir(root, name="run_a", records=RECORDS, batch_size=4, seq_len=8):
  workdir = root / name
  workdir.mkdir()
  with open(workdir / "metrics.jsonl", "w") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
  with open(workdir / "config.json", "w") as f:
    json.dump({"train": {"batch_size": batch_size, "seq_len": seq_len}}, f)
  return workdir


def test_parsed_arrays_equal_the_numbers_written(tmp_path):
  run = plot.read_run(_workdir(tmp_path))
  assert run.name == "run_a"
  assert run.tokens_per_step == 32
  assert run.loss_floor == 1.25 and run.bayes_loss == 1.5
  steps, loss = run.get("train/loss")
  np.testing.assert_array_equal(steps, [10, 20])
  np.testing.assert_array_equal(loss, [3.0, 2.0])
  steps, loss = run.get("eval/loss")
  np.testing.assert_array_equal(steps, [20])
  np.testing.assert_array_equal(loss, [2.25])
  assert plot.layer_names(run.series, "load") == ["layer_0", "layer_1"]
  steps, load = run.load("layer_1")
  np.testing.assert_array_equal(steps, [10, 20])
  np.testing.assert_allclose(load, [[0.2, 0.4, 0.4], [1 / 3, 1 / 3, 1 / 3]])
  steps, max_vio = plot.layer_mean(run.series, "max_vio")
  np.testing.assert_array_equal(steps, [10, 20])
  np.testing.assert_allclose(max_vio, [(0.5 + 0.2) / 2, (0.2 + 0.0) / 2])
  _, dropped = plot.layer_mean(run.series, "dropped_frac")
  np.testing.assert_allclose(dropped, [0.05, 0.025])
  assert plot.layer_mean(run.series, "experts_per_token") is None


def test_layers_sort_by_index_not_by_name(tmp_path):
  records = [{"step": 1, **{f"moe/layer_{i}/max_vio": float(i) for i in (10, 2, 1)}}]
  run = plot.read_run(_workdir(tmp_path, records=records))
  assert plot.layer_names(run.series, "max_vio") == ["layer_1", "layer_2", "layer_10"]


def _assert_pngs(paths):
  for path in paths:
    assert path.endswith(".png") and os.path.getsize(path) > 1000, path
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_one_workdir_writes_every_plot(tmp_path):
  out = tmp_path / "plots"
  paths = plot.plot_runs([_workdir(tmp_path)], str(out))
  assert sorted(os.path.basename(p) for p in paths) == ["balance.png", "load_run_a.png",
                                                        "loss.png"]
  _assert_pngs(paths)


def test_two_workdirs_overlaid_with_their_names(tmp_path):
  second = [dict(r) for r in RECORDS]
  second[1] = {**second[1], "train/loss": 2.5}
  a, b = _workdir(tmp_path), _workdir(tmp_path, "run_b", records=second, batch_size=2)
  runs = [plot.read_run(a), plot.read_run(b)]
  assert [r.name for r in runs] == ["run_a", "run_b"]
  assert [r.tokens_per_step for r in runs] == [32, 16]
  # The CLI entry point, as the end-of-run summary prints it.
  out = tmp_path / "plots"
  assert plot.main([str(a), str(b), "--out", str(out)]) == 0
  names = sorted(os.listdir(out))
  assert names == ["balance.png", "load_run_a.png", "load_run_b.png", "loss.png"]
  _assert_pngs([str(out / n) for n in names])


def test_same_basename_gets_the_parent_in_its_label(tmp_path):
  (tmp_path / "x").mkdir()
  (tmp_path / "y").mkdir()
  labels = plot.run_labels([str(tmp_path / "x" / "run"), str(tmp_path / "y" / "run"),
                            str(tmp_path / "z")])
  assert labels == ["x/run", "y/run", "z"]


def test_missing_or_empty_metrics_file_is_named(tmp_path, capsys):
  missing = tmp_path / "nothing_here"
  missing.mkdir()
  with pytest.raises(FileNotFoundError, match=r"nothing_here/metrics\.jsonl"):
    plot.read_series(missing)
  empty = tmp_path / "empty_run"
  empty.mkdir()
  (empty / "metrics.jsonl").write_text("")
  with pytest.raises(ValueError, match=r"empty_run/metrics\.jsonl.*no metrics records"):
    plot.read_series(empty)
  assert plot.main([str(empty), "--out", str(tmp_path / "o")]) == 2
  assert "empty_run/metrics.jsonl" in capsys.readouterr().err


def test_dense_run_without_moe_layers_plots_loss_and_no_heatmap(tmp_path):
  records = [{"step": 0, "data/loss_floor": 1.0}, {"step": 5, "train/loss": 2.0},
             {"step": 5, "eval/loss": 2.1}]
  paths = plot.plot_runs([_workdir(tmp_path, "dense", records=records)], str(tmp_path / "p"))
  assert sorted(os.path.basename(p) for p in paths) == ["balance.png", "loss.png"]
  _assert_pngs(paths)


def test_run_summary_names_the_plot_command():
  text = format_summary({"eval/loss": 2.0, "checkpoints": "/w/run/checkpoints",
                         "metrics": "/w/run/metrics.jsonl"})
  assert text.splitlines()[-1].split() == ["plots", "python", "-m", "moejax.plot", "/w/run",
                                           "--out", "/w/run/plots"]
