"""What each device does under each mesh layout: the compiled train step on 8 simulated devices.

For every `mesh.preset` (moejax.sharding.MESH_PRESETS) and dispatch, from the compiled step of
configs/default.py's model with a larger batch (so that a device's share is not all padding):
  - per-device FLOPs and bytes accessed (`compiled.cost_analysis()`), and FLOPs x N over the
    one-device step's (1.00 = the work is split N ways, nothing repeated);
  - per-device parameter + optimizer-state bytes (the shard shapes of the train state);
  - the collectives of the compiled step (HLO text) with their total output bytes;
  - the step time, informational only: the 8 simulated devices share the machine's cores.

    python benchmarks/mesh_layouts.py [--json] [--quick]
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moejax import data, sharding  # noqa: E402
from moejax.config import load_config_file, set_fields  # noqa: E402
from moejax.train import BATCH_KEYS, Trainer  # noqa: E402

# (row name, mesh overrides)
LAYOUTS = [
    ("1 device", {"mesh.data": 1}),
    ("data (8)", {"mesh.preset": "data"}),
    ("fsdp (8)", {"mesh.preset": "fsdp"}),
    ("ep_data (EP 4 x data 2)", {"mesh.preset": "ep_data", "mesh.expert": 4}),
    ("ep_fsdp (EP 4 x fsdp 2)", {"mesh.preset": "ep_fsdp", "mesh.expert": 4}),
    ("ep_tensor (EP 4 x tensor 2)", {"mesh.preset": "ep_tensor", "mesh.expert": 4,
                                     "mesh.tensor": 2}),
]
DISPATCHES = [
    ("dropless, all_to_all, worst-case buffers", {"model.moe.dispatch": "dropless"}),
    ("dropless, all_to_all, ep_capacity_factor 1", {"model.moe.dispatch": "dropless",
                                                     "model.moe.ep_capacity_factor": 1.0}),
    ("dropless, ring, ep_capacity_factor 1", {"model.moe.dispatch": "dropless",
                                              "model.moe.ep_exchange": "ring",
                                              "model.moe.ep_capacity_factor": 1.0}),
    ("capacity 1.25", {"model.moe.dispatch": "capacity"}),
]
_COLLECTIVE = re.compile(r"^\s*%\S+ = (.*?) (all-reduce|all-gather|reduce-scatter|all-to-all|"
                         r"collective-permute)(?:-start)?\(", re.MULTILINE)
_ARRAY = re.compile(r"(pred|[a-z]+\d+)\[([\d,]*)\]")


def collectives(hlo: str) -> dict[str, tuple[int, int]]:
  """{op: (count, total output bytes)} of the collectives in compiled HLO text."""
  out = collections.defaultdict(lambda: [0, 0])
  for shape, op in _COLLECTIVE.findall(hlo):
    size = 0
    for dtype, dims in _ARRAY.findall(shape):
      bits = 8 if dtype == "pred" else int(re.sub(r"\D", "", dtype))
      size += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
    out[op][0] += 1
    out[op][1] += size
  return {k: tuple(v) for k, v in sorted(out.items())}


def state_bytes_per_device(trainer: Trainer) -> int:
  """Bytes of the train state (parameters, optimizer moments, counters) on one device."""
  return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
             for a in jax.tree.leaves(trainer.abstract_state()))


def measure(config, num_devices: int, steps: int) -> dict:
  trainer = Trainer(config, mesh=sharding.make_mesh(config.mesh, jax.devices()[:num_devices]))
  shape = (config.train.batch_size, config.train.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=trainer.batch_sharding)
           for k in BATCH_KEYS}
  compiled = trainer.train_step.lower(trainer.abstract_state(), batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  source = data.make_source(config, "train")
  state, times = trainer.init_state(), []
  for _ in range(steps + 1):
    b = trainer.put_batch(source.next())
    tic = time.perf_counter()
    state, out = compiled(state, b)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - tic)
  return {"flops": cost["flops"], "bytes_accessed": cost.get("bytes accessed", float("nan")),
          "state_bytes": state_bytes_per_device(trainer),
          "collectives": collectives(compiled.as_text()),
          "step_ms": 1e3 * float(np.median(times[1:])),
          "dropped_frac": float(np.mean([v for k, v in out.items()
                                         if k.endswith("/dropped_frac")]))}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--json", action="store_true", help="print one JSON object per row")
  p.add_argument("--quick", action="store_true", help="two layouts, one dispatch (a smoke run)")
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--steps", type=int, default=3)
  args = p.parse_args(argv)
  assert jax.device_count() == 8, "needs XLA_FLAGS=--xla_force_host_platform_device_count=8"
  layouts, dispatches = (LAYOUTS[:2], DISPATCHES[:1]) if args.quick else (LAYOUTS, DISPATCHES)
  base_config = load_config_file(os.path.join(REPO, "configs", "default.py"))
  rows = []
  for dname, doverrides in dispatches:
    one = None
    for lname, loverrides in layouts:
      config = set_fields(base_config.copy_and_resolve_references(),
                          {"train.batch_size": args.batch_size, **doverrides, **loverrides})
      n = 1 if lname == "1 device" else 8
      r = measure(config, n, args.steps)
      one = r if n == 1 else one
      r.update(dispatch=dname, layout=lname, devices=n,
               flops_x_n_over_one=r["flops"] * n / one["flops"])
      rows.append(r)
      if args.json:
        print(json.dumps(r), flush=True)
  if not args.json:
    print(f"configs/default.py model, batch {args.batch_size} x {base_config.train.seq_len}, "
          f"jax {jax.__version__}, {jax.device_count()} simulated CPU devices")
    print("| dispatch | layout | GFLOP/device | FLOPs x N / 1-device | MB accessed/device | "
          "state MB/device | collectives (count, MB) | dropped | step ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
      coll = ", ".join(f"{k} {c} ({b / 1e6:.2f})" for k, (c, b) in r["collectives"].items())
      print(f"| {r['dispatch']} | {r['layout']} | {r['flops'] / 1e9:.3f} | "
            f"{r['flops_x_n_over_one']:.3f} | {r['bytes_accessed'] / 1e6:.1f} | "
            f"{r['state_bytes'] / 1e6:.3f} | {coll or '-'} | {r['dropped_frac']:.3f} | "
            f"{r['step_ms']:.1f} |")


if __name__ == "__main__":
  main()
