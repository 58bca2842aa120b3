"""The one script to run when a GPU or TPU is lent (issue 9): the Pallas grouped matmul compiled
for the platform, checked for correctness, then timed, in one command.

1. Correctness, float32 at `highest` matmul precision, the platform's kernel compiled
   (`interpret=False`: `tiles` through Triton on a GPU, `visits` through Mosaic on a TPU):
   `gmm`, `tgmm` and the VJP of `gmm` (MegaBlocks' grouped GEMM, arXiv:2211.15841) against a
   float64 numpy loop over the groups, for group sizes that are even, random, with empty groups,
   all in one group, not multiples of the tile, summing below M (rows past the sum are zeros),
   and G = 256 groups; bfloat16 inputs (float32 accumulation) against the same loop at a
   bfloat16 tolerance; and the MoE layer with the `pallas` backend against `ragged_dot`.
2. Timings, bfloat16, T=16384, D=1024, F=4096, E=8 K=2 and E=64 K=8: the grouped matmul alone
   (`benchmarks/gmm.py --gpu`) and the MoE layer fwd+bwd against the plain-JAX dense SwiGLU
   (`benchmarks/moe_layer.py --gpu`), each in its own process.

    python benchmarks/device_check.py                 # on the device: parts 1 and 2
    python benchmarks/device_check.py --cpu           # part 1 only, in the Pallas interpreter at
                                                      # small sizes: checks this script itself

Prints markdown; copy the tables into benchmarks/RESULTS.md with the date and the device. The
device tool of this project gives 15 minutes per task: part 1 takes well under one minute once
compiled, and each timing run prints as it goes.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
if "--cpu" in sys.argv:
  os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moejax.kernels.gmm import gmm, tgmm  # noqa: E402


def group_size_cases(m: int, g: int, tile: int, rng) -> dict[str, np.ndarray]:
  """name -> group sizes [g] over m rows (g >= 4): every edge of the kernel contract."""
  even = np.full(g, m // g)
  even[: m - even.sum()] += 1
  random = np.bincount(rng.integers(0, g, m), minlength=g)
  empty = random.copy()
  empty[1::3] = 0
  one = np.zeros(g, int)
  one[g // 2] = m
  ragged = np.full(g, 0)
  ragged[:4] = [tile + 1, tile - 1, 3, 1]              # not multiples of the tile
  below = (random * 0.6).astype(int)                   # sum < m: the rest must be zeros
  return {"even": even, "random": random, "empty_groups": empty, "all_in_one": one,
          "not_tile_multiples": ragged, "sum_below_m": below}


def reference(lhs, rhs, sizes, dy):
  """float64 loop: out [M, N], d lhs [M, K], d rhs [G, K, N] of sum(out * dy)."""
  lhs, rhs, dy = (np.asarray(a, np.float64) for a in (lhs, rhs, dy))
  out, d_lhs, d_rhs = np.zeros((lhs.shape[0], rhs.shape[2])), np.zeros_like(lhs), np.zeros_like(rhs)
  start = 0
  for g, n in enumerate(sizes):
    rows = slice(start, start + n)
    out[rows] = lhs[rows] @ rhs[g]
    d_lhs[rows] = dy[rows] @ rhs[g].T
    d_rhs[g] = lhs[rows].T @ dy[rows]
    start += n
  return out, d_lhs, d_rhs


def rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def check_kernel(m: int, k: int, n: int, g: int, dtype, interpret: bool, tol: float) -> list:
  """Rows (case, dtype, rel. errors of out, d lhs, d rhs, tgmm, ok) for every group-size case."""
  rng = np.random.default_rng(0)
  rows = []
  fwd_bwd = jax.jit(lambda lhs, rhs, s, dy: jax.vjp(
      lambda a, b: gmm(a, b, s, interpret=interpret), lhs, rhs)[1](dy))
  fwd = jax.jit(lambda lhs, rhs, s: gmm(lhs, rhs, s, interpret=interpret))
  t_only = jax.jit(lambda lhs, dy, s: tgmm(lhs, dy, s, interpret=interpret,
                                           out_dtype=jnp.float32))
  for name, sizes in group_size_cases(m, g, 128, rng).items():
    lhs = rng.standard_normal((m, k)).astype(np.float32)
    rhs = (rng.standard_normal((g, k, n)) * k ** -0.5).astype(np.float32)
    dy = rng.standard_normal((m, n)).astype(np.float32)
    want = reference(*(np.asarray(jnp.asarray(a, dtype).astype(jnp.float32))
                       for a in (lhs, rhs)), sizes, np.asarray(jnp.asarray(dy, dtype)
                                                           .astype(jnp.float32)))
    args = [jnp.asarray(a, dtype) for a in (lhs, rhs)]
    s = jnp.asarray(sizes, jnp.int32)
    out = fwd(*args, s)
    d_lhs, d_rhs = fwd_bwd(*args, s, jnp.asarray(dy, dtype))
    t = t_only(args[0], jnp.asarray(dy, dtype), s)
    errs = [rel_err(out, want[0]), rel_err(d_lhs, want[1]), rel_err(d_rhs, want[2]),
            rel_err(t, want[2])]
    tail = np.abs(np.asarray(out, np.float64)[sizes.sum():]).max(initial=0.0)
    rows.append((name, jnp.dtype(dtype).name, *errs, tail,
                 all(e <= tol for e in errs) and tail == 0.0))
  return rows


def check_layer() -> float:
  """Max |difference| of the MoE layer's output with `pallas` and with `ragged_dot`."""
  from flax import nnx                                        # noqa: PLC0415
  from moejax.config import load_config_file                  # noqa: PLC0415
  from moejax.moe import MoELayer                             # noqa: PLC0415

  model = load_config_file(os.path.join(REPO, "configs", "default.py")).model
  model.d_model, model.d_ff, model.moe.num_experts, model.moe.top_k = 64, 128, 8, 2
  x = jax.random.normal(jax.random.key(0), (2, 64, 64))
  outs = []
  for backend in ("ragged_dot", "pallas"):
    model.moe.gmm_backend = backend
    layer = MoELayer(model, rngs=nnx.Rngs(0))   # `pallas` compiles where it has a lowering
    outs.append(np.asarray(nnx.jit(lambda lay, x: lay(x)[0])(layer, x)))
  return float(np.abs(outs[0] - outs[1]).max())


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--cpu", action="store_true",
                 help="part 1 only, in the Pallas interpreter at small sizes (a smoke test)")
  p.add_argument("--skip_timings", action="store_true", help="part 1 only")
  args = p.parse_args(argv)
  interpret = args.cpu
  dev = jax.devices()[0]
  print(f"# device check, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: jax "
        f"{jax.__version__}, {jax.default_backend()} {dev.device_kind} x{jax.device_count()}, "
        f"{'interpreted' if interpret else 'compiled'} kernels\n")
  m, k, n = (300, 64, 96) if args.cpu else (4096, 512, 1024)
  ok = True
  print("| case | dtype | G | out | d lhs | d rhs | tgmm | max |rows past sum| | ok |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  with jax.default_matmul_precision("highest"):
    for g, dtype, tol in ((8, jnp.float32, 1e-5), (64 if args.cpu else 256, jnp.float32,
                                                   1e-5), (8, jnp.bfloat16, 2e-2)):
      for row in check_kernel(m, k, n, g, dtype, interpret, tol):
        name, dt, *errs, tail, good = row
        ok &= good
        print(f"| {name} | {dt} | {g} | " + " | ".join(f"{e:.1e}" for e in errs)
              + f" | {tail:.1e} | {'yes' if good else 'NO'} |")
    diff = check_layer()
  ok &= diff < 1e-4
  print(f"\nMoE layer, `pallas` vs `ragged_dot`: max |difference| {diff:.1e} "
        f"({'ok' if diff < 1e-4 else 'NOT OK'})\n")
  if args.cpu or args.skip_timings:
    return 0 if ok else 1
  for script, extra in (("gmm.py", ["--gpu", "--no_ffn", "--backends", "pallas", "blocked"]),
                        ("moe_layer.py", ["--gpu", "--backends", "pallas", "blocked"])):
    print(f"\n## benchmarks/{script} {' '.join(extra)}\n", flush=True)
    subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), *extra],
                   check=False)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
