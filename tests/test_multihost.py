"""Several hosts give the numbers of one: two real processes joined by `jax.distributed` (CPU,
gloo collectives over localhost, 4 simulated devices each) train the same 8-device run as one
process with 8 devices, on ArrayRecord files through Grain (each process reads only its own
rows), with expert parallelism EP 4 x data 2 (the batch is split over both processes; the tokens
travel to their experts by all-to-all within each). The two-process Grain run
is also killed half-way (stop_after) and resumed from its orbax checkpoint, whose data state
was gathered from both processes. Only process 0 writes metrics.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from array_record.python import array_record_module

from moejax.metrics import read_metrics
from moejax.train import train_and_evaluate

from helpers import ROOT, load_config

WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")
TINY = {"model.vocab_size": 256, "model.d_model": 32, "model.num_heads": 2,
        "model.num_kv_heads": 2, "model.head_dim": 16, "model.d_ff": 64, "model.num_layers": 2,
        "model.max_len": 32, "model.moe.num_experts": 4, "model.moe.top_k": 2,
        "data.num_domains": 2, "data.branching": 2, "train.steps": 8, "train.batch_size": 8,
        "train.seq_len": 32, "train.warmup_steps": 2, "train.eval_every": 4,
        "train.eval_batches": 2, "train.checkpoint_every": 4, "train.keep_checkpoints": 2,
        "train.log_every": 1, "mesh.data": -1}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_two_processes(workdir, overrides, stop_after=0) -> list[dict]:
  """Runs the worker as processes 0 and 1 of one job; returns their summaries."""
  port, args = _free_port(), [workdir, json.dumps(overrides), str(stop_after)]
  env = {**os.environ, "MOEJAX_TEST_JAX_CACHE": os.path.join(ROOT, ".jax_cache"),
         "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, WORKER, str(p), "2", str(port), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for p in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return [json.loads(line[len("SUMMARY "):]) for out in outs for line in out.splitlines()
          if line.startswith("SUMMARY ")]


def _losses(workdir, key="train/loss"):
  return {r["step"]: r[key] for r in read_metrics(workdir) if key in r}


def _array_record_corpus(folder) -> str:
  rng = np.random.default_rng(0)
  words = "the a of to and in is was for on that with as by at from it an were are".split()
  os.makedirs(folder, exist_ok=True)
  for f in range(2):
    writer = array_record_module.ArrayRecordWriter(os.path.join(folder, f"part-{f}.array_record"),
                                                   "group_size:1")
    for i in range(30):
      writer.write((f"doc {f}-{i}: " + " ".join(rng.choice(words, rng.integers(3, 25))) + ".")
                   .encode("utf-8"))
    writer.close()
  return f"array_record:{folder}/*.array_record"


@pytest.mark.parametrize("source", ["array_record"])
def test_two_processes_train_like_one(tmp_path, source):
  # Expert parallelism, EP 4 x data 2: the data axis spans the two processes.
  overrides = {**TINY, "mesh.expert": 4}
  if source == "array_record":
    overrides.update({"data.source": _array_record_corpus(str(tmp_path / "corpus")),
                      "data.packing_bins": 2})
  one = str(tmp_path / "one_process")
  train_and_evaluate(load_config(**overrides), one, progress=False)
  two = str(tmp_path / "two_processes")
  if source == "array_record":   # killed at step 5, resumed by a new pair of processes
    first = _run_two_processes(two, overrides, stop_after=5)
    assert [s["step"] for s in first] == [5, 5] and all(s["stopped_early"] for s in first)
  summaries = _run_two_processes(two, overrides)
  assert sorted(s["process"] for s in summaries) == [0, 1]
  assert all(s["step"] == 8 and not s["stopped_early"] for s in summaries)
  a, b = _losses(one), _losses(two)
  assert sorted(a) == sorted(b) == list(range(1, 9))   # one writer: no step twice
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=2e-6)
  ea, eb = _losses(one, "eval/loss"), _losses(two, "eval/loss")
  assert sorted(ea) == sorted(eb) == [4, 8]
  np.testing.assert_allclose([eb[s] for s in (4, 8)], [ea[s] for s in (4, 8)], rtol=2e-6)
  # Both processes report the same final eval loss (it is one global computation).
  assert summaries[0]["eval/loss"] == summaries[1]["eval/loss"]
