"""Training end to end: the loss approaches the data's floor, resume is exact, the mesh size
does not change the numbers, and SIGTERM leaves a complete checkpoint."""
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from moejax import data, sharding
from moejax.metrics import read_metrics
from moejax.train import Trainer, train_and_evaluate

from helpers import ROOT, load_config, set_fields


def tiny_config(config_name="default", **overrides):
  """A model and language small enough to learn in seconds on 2 CPU cores, from
  configs/<config_name>.py (its router, dispatch and top-k kept)."""
  c = load_config(config_name)
  c.model.update(vocab_size=32, d_model=32, num_heads=2, num_kv_heads=2, head_dim=16, d_ff=64,
                 num_layers=2, max_len=32)
  c.model.moe.update(num_experts=4, routing_group=32)   # one sequence per routing group
  c.data.update(num_domains=2, branching=2)
  c.train.update(steps=8, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=2, eval_every=4,
                 eval_batches=2, checkpoint_every=4, keep_checkpoints=2, log_every=1)
  c.mesh.data = 1
  return set_fields(c, overrides)


def _losses(workdir, key="train/loss"):
  return {r["step"]: r[key] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
          if key in r}


def test_loss_approaches_the_floor(tmp_path):
  config = tiny_config(**{"train.steps": 150, "train.eval_every": 150, "train.log_every": 50,
                          "train.warmup_steps": 10, "train.checkpoint_every": 1000,
                          "train.eval_batches": 8})
  summary = train_and_evaluate(config, str(tmp_path), progress=False)
  floor, bayes = summary["data/loss_floor"], summary["data/bayes_loss"]
  uniform = np.log(config.model.vocab_size)
  first_loss = _losses(str(tmp_path))[50]
  # Most of the way from a uniform guess to the entropy-rate floor...
  gap_closed = (uniform - summary["eval/loss"]) / (uniform - floor)
  assert gap_closed > 0.9, (summary["eval/loss"], floor, uniform)
  assert summary["eval/loss"] < first_loss
  # ...but not below the Bayes-optimal predictor on the same eval batches (up to noise).
  assert summary["eval/loss"] > bayes - 0.05, (summary["eval/loss"], bayes)


def test_trains_on_local_text_files(tmp_path):
  """The text source end to end: packed byte rows with segment ids through the train step. The
  loss must drop below the text's unigram entropy, which needs the context."""
  text = b"the quick brown fox jumps over the lazy dog; pack my box with five dozen jugs. " * 30
  for i in range(3):
    (tmp_path / f"doc{i}.txt").write_bytes(text)
  config = tiny_config(**{"data.source": "text", "data.text_glob": str(tmp_path / "*.txt"),
                          "model.vocab_size": 256, "train.steps": 60, "train.eval_every": 60,
                          "train.log_every": 20, "train.checkpoint_every": 1000})
  summary = train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  counts = np.bincount(np.frombuffer(text, np.uint8), minlength=256)
  p = counts[counts > 0] / counts.sum()
  unigram_entropy = float(-(p * np.log(p)).sum())
  assert "data/loss_floor" not in summary
  assert summary["eval/loss"] < unigram_entropy - 0.5, (summary["eval/loss"], unigram_entropy)


def test_resume_equals_uninterrupted_run(tmp_path):
  config = tiny_config()
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train_and_evaluate(config, straight, progress=False)
  first = train_and_evaluate(config, resumed, progress=False, stop_after=5)
  assert first["stopped_early"] and first["step"] == 5
  second = train_and_evaluate(config, resumed, progress=False)
  assert second["step"] == config.train.steps
  a, b = _losses(straight), _losses(resumed)
  assert sorted(a) == sorted(b) == list(range(1, config.train.steps + 1))   # no duplicate steps
  assert [a[s] for s in sorted(a)] == [b[s] for s in sorted(b)]              # bit-identical
  assert _losses(straight, "eval/loss") == _losses(resumed, "eval/loss")
  # A finished workdir trains no further and reports the final eval loss again.
  lines_before = read_metrics(os.path.join(resumed, "metrics.jsonl"))
  third = train_and_evaluate(config, resumed, progress=False)
  assert third["step"] == config.train.steps and "train/loss" not in third
  assert third["eval/loss"] == _losses(resumed, "eval/loss")[config.train.steps]
  assert read_metrics(os.path.join(resumed, "metrics.jsonl")) == lines_before


def test_stochastic_router_resumes_exactly_from_a_periodic_checkpoint(tmp_path):
  """Switch (jitter noise from the train key, capacity dispatch) killed after step 6, whose stop
  checkpoint is lost: the restart takes the periodic checkpoint of step 4, replays steps 5-6
  with the same noise and ends bit-identical to an uninterrupted run."""
  config = tiny_config("switch")
  assert config.model.moe.router_args.jitter_noise > 0 and config.model.moe.dispatch == "capacity"
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train_and_evaluate(config, straight, progress=False)
  train_and_evaluate(config, resumed, progress=False, stop_after=6)
  ckpts = os.path.join(resumed, "checkpoints")
  assert sorted(os.listdir(ckpts)) == ["4", "6"]
  shutil.rmtree(os.path.join(ckpts, "6"))   # as if killed before the stop checkpoint
  assert train_and_evaluate(config, resumed, progress=False)["step"] == 8
  a, b = _losses(straight), _losses(resumed)
  assert sorted(a) == sorted(b) == list(range(1, 9))
  assert [a[s] for s in sorted(a)] == [b[s] for s in sorted(b)]              # bit-identical
  assert _losses(straight, "eval/loss") == _losses(resumed, "eval/loss")


def test_train_key_is_folded_with_the_step():
  """The same params and batch at steps 3 and 4 give different Switch losses (new jitter noise
  each step), and equal ones without jitter: the difference is the per-step key and only it."""
  losses = {}
  for jitter in (0.01, 0.0):
    config = tiny_config("switch", **{"model.moe.router_args.jitter_noise": jitter})
    trainer = Trainer(config)
    batch = trainer.put_batch(data.make_source(config, "train").next())
    for step in (3, 4):
      state = trainer.init_state()
      state["step"] = jax.device_put(np.int32(step), state["step"].sharding)
      losses[jitter, step] = float(trainer.train_step(state, batch)[1]["train/loss"])
  assert losses[0.0, 3] == losses[0.0, 4], losses
  assert losses[0.01, 3] != losses[0.01, 4], losses
  # The noise is small: the jittered losses stay near the noiseless one.
  assert abs(losses[0.01, 3] - losses[0.0, 3]) < 1e-2 * losses[0.0, 3], losses


def test_only_process_zero_writes_metrics(tmp_path, monkeypatch):
  """A multi-host run has one metrics writer: a process other than 0 trains and checkpoints but
  writes no metrics file and no TensorBoard events."""
  import moejax.train
  monkeypatch.setattr(moejax.train, "_primary_process", lambda: False)
  summary = train_and_evaluate(tiny_config(), str(tmp_path), progress=True)
  assert summary["step"] == 8 and np.isfinite(summary["eval/loss"])
  assert not os.path.exists(tmp_path / "metrics.jsonl") and not os.path.exists(tmp_path / "tb")
  assert os.listdir(tmp_path / "checkpoints")


@pytest.mark.parametrize("config_name", ["switch"])
def test_one_device_equals_eight_devices(config_name):
  """Switch (jittered router input, capacity dispatch): the jitter noise is drawn the same
  whatever the mesh. (The default dropless config on every layout: tests/test_scale_out.py.)"""
  assert len(jax.devices()) == 8, "tests/conftest.py simulates 8 CPU devices"
  config = tiny_config(config_name)
  source = data.make_source(config, "train")
  batches = [source.next() for _ in range(3)]
  losses = {}
  for n in (1, 8):
    config.mesh.data = n
    trainer = Trainer(config, mesh=sharding.make_mesh(config.mesh, jax.devices()[:n]))
    state = trainer.init_state()
    losses[n] = []
    for b in batches:
      state, out = trainer.train_step(state, trainer.put_batch(b))
      losses[n].append(float(out["train/loss"]))
    if n == 8:
      assert len(state["params"]["embed"].sharding.device_set) == 8
  np.testing.assert_allclose(losses[1], losses[8], rtol=2e-5)


def test_sigterm_saves_a_complete_checkpoint_and_exits_cleanly(tmp_path):
  workdir = tmp_path / "run"
  args = [sys.executable, "-m", "moejax.main", "--config=configs/default.py",
          f"--workdir={workdir}"]
  config = tiny_config(**{"train.steps": 100000, "train.checkpoint_every": 100000,
                          "train.eval_every": 100000})
  for section in ("model", "train", "data"):
    for key, value in config[section].items():
      if not hasattr(value, "items"):
        args.append(f"--config.{section}.{key}={value}")
  args += ["--config.model.moe.num_experts=4", "--config.mesh.data=1"]
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and any(r.get("step", 0) >= 3 for r in read_metrics(str(metrics))):
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.communicate()[0][-3000:]
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-3000:]
  steps = sorted(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit())
  assert steps and 3 <= steps[-1] < 100000, steps
  assert not [p for p in os.listdir(workdir / "checkpoints") if "tmp" in p]
  last_logged = max(r["step"] for r in read_metrics(str(metrics)))
  assert steps[-1] == last_logged
  assert "stopped_early" in out and "True" in out.split("stopped_early")[-1].splitlines()[0]
