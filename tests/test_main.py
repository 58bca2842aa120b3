"""The command line: `python -m moejax.main` hands its distributed flags to jax.distributed
before anything touches a device. (Training through jax.distributed: tests/test_multihost.py;
main training and stopping cleanly: tests/test_train.py's SIGTERM test.)"""
import os
import socket
import subprocess
import sys

from helpers import ROOT


def test_main_hands_its_flags_to_jax_distributed(tmp_path):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  workdir = tmp_path / "run"
  args = [sys.executable, "-m", "moejax.main", "--config=configs/default.py",
          f"--workdir={workdir}", f"--coordinator_address=localhost:{port}",
          "--num_processes=1", "--process_id=0", "--config.train.steps=2",
          "--config.train.eval_every=2", "--config.train.eval_batches=1",
          "--config.model.num_layers=1", "--config.train.warmup_steps=1", "--config.mesh.data=1"]
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  # The flags reach jax.distributed: process id 1 of a one-process job is refused at once.
  bad = subprocess.run([a for a in args if not a.startswith("--process_id")] + ["--process_id=1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "process_id < num_processes" in (bad.stdout + bad.stderr)
