"""A failing write during a save: a child process saves with RLIMIT_FSIZE lowered below the size
of the checkpoint's data file after step 4 (the kernel fails the write with EFBIG, as a full disk
fails it with ENOSPC, both deep in tensorstore). The run stops with a `CheckpointWriteError`
naming the step's directory; the previous checkpoint is intact and a restart resumes from it to
the losses of an uninterrupted run."""
import json
import os
import subprocess
import sys

import jax
import numpy as np

from moejax.metrics import read_metrics
from moejax.train import train_and_evaluate

from helpers import ROOT
from test_train import tiny_config

CHILD = r"""
import json, os, resource, signal, sys
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
from moejax import checkpoint
from moejax.train import train_and_evaluate
from test_train import tiny_config

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a failed write, not a killed process
save = checkpoint.Checkpointer.save

def save_then_fill_the_disk(self, step, state, extra, force=False):
  if step == 6:
    self.wait()   # step 4 is on disk; from now on no file may grow past 20 kB
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
  return save(self, step, state, extra, force)

checkpoint.Checkpointer.save = save_then_fill_the_disk
try:
  train_and_evaluate(tiny_config(**json.loads(sys.argv[3])), sys.argv[2], progress=False)
except checkpoint.CheckpointWriteError as e:
  print("CheckpointWriteError: " + str(e), flush=True)
  sys.exit(3)
"""

OVERRIDES = {"train.checkpoint_every": 2, "train.eval_every": 2, "train.keep_checkpoints": 5}


def test_a_failing_write_names_the_path_and_a_restart_uses_the_previous_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  # The test process's XLA flags (its devices and code generation: the losses below are compared
  # bit for bit) and compilation cache (conftest.py): the restart and the straight run below take
  # the child's compiled programs from the cache instead of compiling them again.
  env = {**os.environ, "XLA_FLAGS": os.environ["XLA_FLAGS"],
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
         "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or "",
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS":
             str(jax.config.jax_persistent_cache_min_compile_time_secs)}
  proc = subprocess.run([sys.executable, "-c", CHILD, ROOT, workdir, json.dumps(OVERRIDES)],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 3, (proc.stdout + proc.stderr)[-3000:]
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith("CheckpointWriteError")][0]
  ckpts = os.path.join(workdir, "checkpoints")
  assert f"checkpoint step 6 could not be written to {os.path.join(ckpts, '6')}" in line, line
  assert "File too large" in line, line
  assert f"latest complete checkpoint is step 4 ({os.path.join(ckpts, '4')}), intact" in line
  assert sorted(n for n in os.listdir(ckpts) if n.isdigit()) == ["2", "4"]

  # The restart resumes from step 4 (deleting the unfinished save) and ends where an
  # uninterrupted run ends.
  config = tiny_config(**OVERRIDES)
  config.mesh.data = 1
  summary = train_and_evaluate(config, workdir, progress=False)
  assert summary["step"] == 8
  assert sorted(os.listdir(ckpts)) == ["2", "4", "6", "8"]   # no tmp directory left
  straight = str(tmp_path / "straight")
  train_and_evaluate(config, straight, progress=False)
  with open(os.path.join(straight, "config.json")) as f:   # the run's config, in its workdir
    written = json.load(f)
  assert written["train"]["steps"] == config.train.steps
  assert written["model"]["moe"]["router"] == config.model.moe.router
  losses = lambda w: [r["train/loss"] for r in read_metrics(w) if "train/loss" in r]
  assert len(losses(workdir)) == 8
  np.testing.assert_array_equal(losses(workdir), losses(straight))
