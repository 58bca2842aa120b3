"""Speed and memory of the grouped matmul alone, per backend, against a dense matmul with the
same FLOPs, and of the dropless expert FFN with and without the fused row gather.

Part 1, gmm: forward+backward (`jax.grad` of sum(gmm(lhs, rhs) * cot) in lhs and rhs, under
`jax.jit`) of every backend in `moejax.kernels.GMM_BACKENDS` (MegaBlocks' grouped GEMM,
arXiv:2211.15841) at the expert up-projection of an MoE layer, M = T*K rows of width D into
E experts of width F, with random expert choices; and of the dense matmul [T, D] x [D, K*F]
that does the same FLOPs. Reports ms, achieved GFLOP/s (TFLOP/s on an accelerator) of the real
6*M*D*F FLOPs, x dense, the ratio to every other backend, and the peak memory XLA planned
(`compiled.memory_analysis()`: arguments + outputs + temporaries - aliased).

Part 2, fused gather: the dropless SwiGLU expert FFN (arXiv:2002.05202) from tokens [T, D] to
expert outputs combined back to [T, D], forward+backward, once as permute -> 3 x chunked gmm ->
unpermute_combine and once with the gate and up projections reading their rows through the
sort index (`gather_gmm`, ScatterMoE, arXiv:2403.08245), so the permuted [T*K, D] copy is never
built; ms and planned peak memory of each, and the difference.

    python benchmarks/gmm.py              # issue 9's shapes: T=4096, D=512, d_ff=1024
    python benchmarks/gmm.py --quick      # tiny, and includes the interpreted `pallas` backend
    python benchmarks/gmm.py --gpu        # T=16384, D=1024, d_ff=4096, bfloat16
    python benchmarks/gmm.py --json out.json

On the CPU the `pallas` backend runs in the Pallas interpreter, so only --quick (or naming it in
--backends) times it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

if "--gpu" not in sys.argv:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moejax.kernels import GMM_BACKENDS, chunked_gmm  # noqa: E402
from moejax.kernels.permute import gather_gmm, permute, unpermute_combine  # noqa: E402

# name -> (E, K, expert width divisor): coarse E=8 K=2 F=d_ff; fine E=64 K=8 F=d_ff/8.
SHAPES = {"coarse E=8 K=2": (8, 2, 1), "fine E=64 K=8": (64, 8, 8)}


def peak_bytes(fn, args):
  """Arguments + outputs + temporaries - aliased bytes of fn's compiled executable."""
  try:
    m = fn.lower(*args).compile().memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)
  except Exception:  # noqa: BLE001
    return None


def time_ms(fns, warmup, repeats):
  """Median ms per case, timed runs interleaved across cases."""
  for fn, args in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn(*args))
  times = {n: [] for n in fns}
  for _ in range(repeats):
    for n, (fn, args) in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[n].append(time.perf_counter() - start)
  return {n: 1e3 * statistics.median(t) for n, t in times.items()}


def routing(t, e, k, seed):
  """Random distinct top-k expert choices: sort_index, inverse [T*K], group_sizes [E]."""
  rng = np.random.default_rng(seed)
  idx = np.argsort(rng.random((t, e)), axis=1)[:, :k]                    # [T, K]
  sort_index = np.argsort(idx.reshape(-1), kind="stable").astype(np.int32)
  inverse = np.argsort(sort_index).astype(np.int32)
  sizes = np.bincount(idx.reshape(-1), minlength=e).astype(np.int32)
  return jnp.asarray(sort_index), jnp.asarray(inverse), jnp.asarray(sizes)


def gmm_cases(t, d, f, e, k, dtype, backends):
  """{case: (jitted fwd+bwd, args)} for `dense` and every backend; and the FLOPs."""
  rng = np.random.default_rng(0)
  m = t * k
  _, _, sizes = routing(t, e, k, 0)
  lhs = jnp.asarray(rng.standard_normal((m, d)), dtype)
  rhs = jnp.asarray(rng.standard_normal((e, d, f)) * d ** -0.5, dtype)
  cot = jnp.asarray(rng.standard_normal((m, f)), dtype)
  x = jnp.asarray(rng.standard_normal((t, d)), dtype)
  w = jnp.asarray(rng.standard_normal((d, k * f)) * d ** -0.5, dtype)
  dcot = jnp.asarray(rng.standard_normal((t, k * f)), dtype)

  def grad_of(fn):
    return jax.jit(jax.grad(lambda a, b, g, c: jnp.sum((fn(a, b, g) * c).astype(jnp.float32)),
                            argnums=(0, 1)))

  cases = {"dense": (grad_of(lambda a, b, g: a @ b), (x, w, None, dcot))}
  for b in backends:
    cases[b] = (grad_of(GMM_BACKENDS[b]), (lhs, rhs, sizes, cot))
  return cases, 6.0 * m * d * f


def ffn_cases(t, d, f, e, k, dtype):
  """{case: (jitted fwd+bwd, args)}: the dropless SwiGLU expert FFN, permuted copy vs fused
  gather, loss sum(y * cot) in the weights and the input."""
  rng = np.random.default_rng(1)
  sort_index, inverse, sizes = routing(t, e, k, 1)
  x = jnp.asarray(rng.standard_normal((t, d)), dtype)
  cw = jnp.asarray(rng.random((t, k)), jnp.float32)
  w = {n: jnp.asarray(rng.standard_normal(s) * s[1] ** -0.5, dtype)
       for n, s in (("gate", (e, d, f)), ("up", (e, d, f)), ("down", (e, f, d)))}
  cot = jnp.asarray(rng.standard_normal((t, d)), dtype)

  def permuted(w, x):
    xs = permute(x, sort_index, inverse, k)                               # [T*K, D] copy
    h = jax.nn.silu(chunked_gmm(xs, w["gate"], sizes)) * chunked_gmm(xs, w["up"], sizes)
    y = unpermute_combine(chunked_gmm(h, w["down"], sizes), sort_index, inverse, cw)
    return jnp.sum((y * cot).astype(jnp.float32))

  def fused(w, x):
    g = gather_gmm(x, w["gate"], sizes, sort_index, inverse, k)           # rows read via index
    u = gather_gmm(x, w["up"], sizes, sort_index, inverse, k)
    y = unpermute_combine(chunked_gmm(jax.nn.silu(g) * u, w["down"], sizes), sort_index,
                          inverse, cw)
    return jnp.sum((y * cot).astype(jnp.float32))

  grad = lambda fn: jax.jit(jax.grad(fn, argnums=(0, 1)))
  return {"permute + chunked": (grad(permuted), (w, x)),
          "fused gather (gather_gmm)": (grad(fused), (w, x))}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tokens", type=int, default=4096)
  p.add_argument("--d_model", type=int, default=512)
  p.add_argument("--d_ff", type=int, default=1024)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--backends", nargs="+", default=None, choices=list(GMM_BACKENDS))
  p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--no_ffn", action="store_true", help="skip part 2 (fused gather)")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--gpu", action="store_true")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  if args.quick:
    args.tokens, args.d_model, args.d_ff, args.repeats = 256, 64, 128, 3
  if args.gpu:
    args.tokens, args.d_model, args.d_ff, args.dtype, args.repeats = 16384, 1024, 4096, \
        "bfloat16", 20
  on_cpu = jax.default_backend() == "cpu"
  if args.backends is None:
    args.backends = [b for b in GMM_BACKENDS if args.quick or not (b == "pallas" and on_cpu)]
  unit, scale = ("GFLOP/s", 1e-9) if on_cpu else ("TFLOP/s", 1e-12)
  dtype = jnp.dtype(args.dtype)
  print(f"gmm fwd+bwd (T={args.tokens}, D={args.d_model}, d_ff={args.d_ff}, {args.dtype}; "
        f"median of {args.repeats}; jax {jax.__version__}, {jax.default_backend()} "
        f"{jax.devices()[0].device_kind}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})\n")
  print(f"| shape | case | ms | {unit} | x dense | peak MiB |\n| --- | --- | --- | --- | --- | --- |")
  out = {"args": vars(args), "jax": jax.__version__, "gmm": {}, "ffn": {}}
  for name in args.shapes:
    e, k, div = SHAPES[name]
    f = args.d_ff // div
    cases, flops = gmm_cases(args.tokens, args.d_model, f, e, k, dtype, args.backends)
    peaks = {c: peak_bytes(fn, a) for c, (fn, a) in cases.items()}
    ms = time_ms(cases, args.warmup, args.repeats)
    for c in cases:
      pk = "" if peaks[c] is None else f"{peaks[c] / 2**20:.0f}"
      print(f"| {name} (M={args.tokens * k}, F={f}) | {c} | {ms[c]:.1f} | "
            f"{flops / (ms[c] * 1e-3) * scale:.1f} | {ms[c] / ms['dense']:.2f} | {pk} |")
    out["gmm"][name] = {"ms": ms, "peak_bytes": peaks, "flops": flops}
  for name in args.shapes:
    ms = out["gmm"][name]["ms"]
    print(f"\n{name}: row time / column time\n| | " + " | ".join(ms) + " |\n"
          + "|---" * (len(ms) + 1) + "|")
    for a in ms:
      print(f"| {a} | " + " | ".join(f"{ms[a] / ms[b]:.2f}" for b in ms) + " |")
  if not args.no_ffn:
    print("\nDropless SwiGLU expert FFN, tokens [T, D] -> combined [T, D], fwd+bwd\n"
          "| shape | case | ms | peak MiB |\n| --- | --- | --- | --- |")
    for name in args.shapes:
      e, k, div = SHAPES[name]
      cases = ffn_cases(args.tokens, args.d_model, args.d_ff // div, e, k, dtype)
      peaks = {c: peak_bytes(fn, a) for c, (fn, a) in cases.items()}
      ms = time_ms(cases, args.warmup, args.repeats)
      for c in cases:
        print(f"| {name} | {c} | {ms[c]:.1f} | {peaks[c] / 2**20:.1f} |")
      a, b = peaks.values()
      saved = (a - b) / 2**20
      expect = (k - 1) * args.tokens * args.d_model * dtype.itemsize / 2**20
      print(f"| {name} | saved by the fused gather | | {saved:.1f} (the (K-1)*T*D copy: "
            f"{expect:.1f}) |")
      out["ffn"][name] = {"ms": ms, "peak_bytes": peaks}
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(out, fh, indent=1)


if __name__ == "__main__":
  main()
