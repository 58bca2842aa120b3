"""Faults of a two-process `jax.distributed` CPU job (tests/multihost_worker.py, 4 simulated
devices each): a SIGTERM to one process stops both after the same agreed step, both save it and
exit 0, and training on from that checkpoint gives the losses of an uninterrupted run; a SIGKILL
to one process makes the other exit non-zero within the heartbeat timeout, with a PeerLostError
naming the last complete checkpoint (or, when it was blocked in a barrier, the coordination
service's abort naming the dead task), and that checkpoint restores."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from moejax import checkpoint, faults
from moejax.metrics import read_metrics
from moejax.train import Trainer, train_and_evaluate

from helpers import ROOT, load_config
from test_multihost import TINY, WORKER, _free_port

# Long enough that the signal always lands mid-run; a stop comes long before the end.
LONG = {**TINY, "train.steps": 400, "train.eval_every": 1000, "train.log_every": 1,
        "train.preemption_check_every": 4, "train.heartbeat_timeout_s": 10}


def _launch(workdir, overrides):
  port, args = _free_port(), [workdir, json.dumps(overrides), "0"]
  env = {**os.environ, "MOEJAX_TEST_JAX_CACHE": os.path.join(ROOT, ".jax_cache"),
         "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  env.pop("XLA_FLAGS", None)
  return [subprocess.Popen([sys.executable, WORKER, str(p), "2", str(port), *args], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for p in range(2)]


def _wait_for_step(workdir, procs, step, timeout=180):
  """Waits until process 0 has logged `step` (both processes are then training)."""
  path, deadline = os.path.join(workdir, "metrics.jsonl"), time.time() + timeout
  while time.time() < deadline:
    if os.path.exists(path) and any(r.get("step", 0) >= step for r in read_metrics(path)):
      return
    if any(p.poll() is not None for p in procs):
      break
    time.sleep(0.1)
  for p in procs:
    p.kill()
  raise AssertionError("no step %d: %s" % (step, [p.communicate()[0][-2000:] for p in procs]))


def _losses(workdir):
  return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


def _steps(workdir):
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  return sorted(int(n) for n in names if n.isdigit()), [n for n in names if not n.isdigit()]


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  two = str(tmp_path / "two")
  overrides = {**LONG, "train.checkpoint_every": 1000}
  procs = _launch(two, overrides)
  _wait_for_step(two, procs, 3)
  procs[1].send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=120)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outs]
  summaries = [json.loads(line[len("SUMMARY "):]) for out in outs for line in out.splitlines()
               if line.startswith("SUMMARY ")]
  stop = summaries[0]["step"]
  assert [s["step"] for s in summaries] == [stop, stop] and stop % 4 == 0 and stop < 400
  assert all(s["stopped_early"] for s in summaries)
  assert _steps(two) == ([stop], [])    # one complete checkpoint, both processes' parts

  # Training on from it (one process, 8 devices) gives the uninterrupted run's losses.
  config = load_config(**overrides)
  one = str(tmp_path / "one")
  train_and_evaluate(config, one, progress=False, stop_after=stop + 2)
  train_and_evaluate(config, two, progress=False, stop_after=stop + 2)
  a, b = _losses(one), _losses(two)
  assert sorted(a) == sorted(b) == list(range(1, stop + 3))
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=2e-6)


def test_a_dead_peer_ends_the_survivor_with_a_clear_error(tmp_path):
  two = str(tmp_path / "two")
  overrides = {**LONG, "train.checkpoint_every": 2, "train.keep_checkpoints": 100}
  procs = _launch(two, overrides)
  _wait_for_step(two, procs, 5)
  procs[1].kill()
  killed = time.time()
  out = procs[0].communicate(timeout=120)[0]
  took = time.time() - killed
  print(f"survivor exit code {procs[0].returncode} after {took:.1f} s")   # shown with -s
  # Bounded: at once when the next collective fails, never later than the heartbeat timeout.
  assert took < overrides["train.heartbeat_timeout_s"] + 5, took
  steps, others = _steps(two)
  assert steps and steps[-1] >= 2, steps
  if procs[0].returncode == faults.EXIT_PEER_LOST:
    # Its collective failed (gloo saw the reset connection): moejax's message.
    line = [ln for ln in out.splitlines() if ln.startswith("PeerLostError")]
    assert line and "another process died" in line[0], out[-3000:]
    assert f"Latest complete checkpoint: step {steps[-1]} in " in line[0], (line, steps)
  else:
    # Blocked where nothing fails (an orbax save's barrier): the coordination service aborts it
    # once the peer misses heartbeats for train.heartbeat_timeout_s, with its own message.
    assert procs[0].returncode == -signal.SIGABRT, (procs[0].returncode, out[-3000:])
    assert "another task died" in out and "stopped sending heartbeats" in out, out[-3000:]
  # The last complete checkpoint restores; an unfinished save is never listed as a step.
  assert all("orbax-checkpoint-tmp" in n for n in others), others
  config = load_config(**overrides)
  trainer = Trainer(config)
  with checkpoint.Checkpointer(os.path.join(two, "checkpoints"), keep=100, every=2) as ckpt:
    assert ckpt.latest_step() == steps[-1]
    step, state, extra = ckpt.restore(abstract_state=trainer.abstract_state())
  assert step == int(state["step"]) == extra["data"]["index"] == steps[-1]
  assert all(np.isfinite(np.asarray(x)).all() for x in
             [state["params"]["embed"], state["params"]["final_norm"]["scale"]])
