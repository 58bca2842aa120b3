"""Speed and memory of one MoE layer against a dense SwiGLU FFN with the same active FLOPs per
token, for every grouped-matmul backend, all in one run.

For each MoE shape this times forward+backward (`jax.value_and_grad` of a scalar loss with
respect to the parameters *and* the input, under `jax.jit`) of
  - `dense`: the fastest dense SwiGLU we can write in JAX, `jax.nn.silu(x @ g) * (x @ u) @ d` on
    [T, D] ("GLU Variants Improve Transformer", Shazeer 2020, arXiv:2002.05202), width K * F/G;
    every ratio is to this one,
  - `dense_module`: the same FFN as moejax's `MLP` module on [1, T, D] (what the layer's shared
    experts use), for comparison,
  - the MoE layer (`MoELayer`) with dropless dispatch, once per grouped-matmul backend in
    `moejax.kernels.GMM_BACKENDS` (MegaBlocks' grouped GEMM, arXiv:2211.15841), and with
    `chunked` also once with `model.moe.fused_gather` (`dropless/chunked+fused`: rows read
    through the sort index, ScatterMoE arXiv:2403.08245),
  - the same layer with capacity dispatch (GShard one-hot einsums, arXiv:2006.16668),
  - `expert_floor`: the experts' SwiGLU alone on rows already grouped into E equal slabs
    [E, T*K/E, D] (one batched einsum per matrix, no router, no permute, no combine): the
    fastest expert compute XLA runs for these FLOPs, a floor no dropless layer can go below
    with XLA's own matmuls,
with the timed runs interleaved, and reports milliseconds, achieved GFLOP/s of the active
FLOPs (6 * T * D * W per matrix: forward and two backward matmuls), the ratio to `dense` and to
every other case, and the peak memory XLA planned for each compiled step
(`compiled.memory_analysis()`: arguments + outputs + temporaries - aliased; on a GPU also
`device.memory_stats()["peak_bytes_in_use"]` after the runs).

Shapes (E, K after granularity G is applied; Krajewski et al. 2024, arXiv:2402.07871):
  - coarse: E=8,  K=2, expert width F        (Mixtral-like; dense width 2F)
  - fine:   E=64, K=8, expert width F/8      (num_experts=8, top_k=1, granularity=8; width F)

    python benchmarks/moe_layer.py            # T=1024, D=128, d_ff=256, about a minute on 2 cores
    python benchmarks/moe_layer.py --issue    # T=4096, D=512, d_ff=1024: issue 9's CPU goals
    python benchmarks/moe_layer.py --quick    # tiny sizes, a smoke test (seconds)
    python benchmarks/moe_layer.py --gpu      # T=16384, D=1024, F=4096, bfloat16: fills one GPU
    python benchmarks/moe_layer.py --backends blocked chunked --json out.json

On the CPU the `pallas` backend runs in the Pallas interpreter (correct, far too slow to time at
these sizes), so it is left out there unless named in --backends.
"""
from __future__ import annotations

import argparse
import dataclasses
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
from flax import nnx  # noqa: E402

from moejax.config import load_config_file  # noqa: E402
from moejax.kernels import GMM_BACKENDS  # noqa: E402

from moejax.moe import MLP, MoELayer, moe_dims  # noqa: E402

# name -> (num_experts, top_k, granularity) before granularity is applied.
SHAPES = {
    "coarse E=8 K=2": (8, 2, 1),
    "fine E=64 K=8": (8, 1, 8),
}


def model_config(d_model: int, d_ff: int, num_experts: int, top_k: int, granularity: int,
                 dispatch: str, routing_group: int, capacity_factor: float,
                 gmm_backend: str = "ragged_dot", dtype: str = "float32"):
  """configs/default.py's `model` with one benchmark case's MoE fields (parameters float32,
  `dtype` the compute dtype)."""
  m = load_config_file(os.path.join(REPO, "configs", "default.py")).model
  m.d_model, m.d_ff, m.dtype = d_model, d_ff, dtype
  m.moe.num_experts, m.moe.top_k, m.moe.granularity = num_experts, top_k, granularity
  m.moe.dispatch, m.moe.capacity_factor = dispatch, capacity_factor
  m.moe["routing_group" if "routing_group" in m.moe else "group_size"] = routing_group
  m.moe.gmm_backend = gmm_backend
  m.moe.num_shared_experts = 0
  return m


def _dims(m):
  """(E, K, F/G) of a model config, across moe_dims' old and new field names."""
  d = moe_dims(m)
  return (getattr(d, "experts", None) or d.num_experts,
          getattr(d, "experts_per_token", None) or d.top_k, d.expert_width)


def module_fwd_bwd(module: nnx.Module):
  """A jitted fn(state, x [1, T, D]) -> (loss, (d state, d x)) for `module`; the loss is
  mean(y^2) (+ the router's weighted aux loss for an MoE layer), so the backward pass reaches
  every parameter and the input, as inside a model."""
  graphdef, state = nnx.split(module)

  def loss_fn(state, x):
    out = nnx.merge(graphdef, state)(x)
    if isinstance(out, tuple):                 # MoELayer: (y, aux_loss, metrics)
      y, aux, _ = out
      return jnp.mean(jnp.square(y.astype(jnp.float32))) + aux
    return jnp.mean(jnp.square(out.astype(jnp.float32)))

  return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1))), state


def dense_swiglu_fwd_bwd(d_model: int, width: int, dtype, key):
  """The plain-JAX baseline: fn(w, x [T, D]) -> (loss, (d w, d x)) of mean(y^2) with
  y = silu(x @ g) * (x @ u) @ d (float32 parameters cast to `dtype`, as the module does)."""
  kg, ku, kd = jax.random.split(key, 3)
  w = {"g": jax.random.normal(kg, (d_model, width), jnp.float32) * d_model ** -0.5,
       "u": jax.random.normal(ku, (d_model, width), jnp.float32) * d_model ** -0.5,
       "d": jax.random.normal(kd, (width, d_model), jnp.float32) * width ** -0.5}

  def loss_fn(w, x):
    g, u, d = (w[n].astype(dtype) for n in "gud")
    y = (jax.nn.silu(x @ g) * (x @ u)) @ d
    return jnp.mean(jnp.square(y.astype(jnp.float32)))

  return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1))), w


def expert_floor_fwd_bwd(d_model: int, num_experts: int, top_k: int, width: int, tokens: int,
                         dtype, key):
  """The floor of the expert compute: fn(w, xs [E, C, D]) -> (loss, (d w, d xs)) of mean(y^2)
  with y = silu(xs @ g) * (xs @ u) @ d per expert slab, C = T*K/E rows each (perfect balance,
  rows already grouped), as batched einsums; returns (fn, (w, xs))."""
  kg, ku, kd, kx = jax.random.split(key, 4)
  e, c = num_experts, tokens * top_k // num_experts
  w = {"g": jax.random.normal(kg, (e, d_model, width), jnp.float32) * d_model ** -0.5,
       "u": jax.random.normal(ku, (e, d_model, width), jnp.float32) * d_model ** -0.5,
       "d": jax.random.normal(kd, (e, width, d_model), jnp.float32) * width ** -0.5}
  xs = jax.random.normal(kx, (e, c, d_model), dtype)

  def loss_fn(w, xs):
    g, u, d = (w[n].astype(dtype) for n in "gud")
    mm = lambda a, b: jnp.einsum("ecd,edf->ecf", a, b)           # noqa: E731
    y = mm(jax.nn.silu(mm(xs, g)) * mm(xs, u), d)
    return jnp.mean(jnp.square(y.astype(jnp.float32)))

  return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1))), (w, xs)


def peak_bytes(fn, args) -> int | None:
  """Arguments + outputs + temporaries - aliased bytes of fn's compiled executable."""
  try:
    m = fn.lower(*args).compile().memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)
  except Exception:  # noqa: BLE001  not every backend reports it
    return None


def time_ms(fns: dict, *, warmup: int, repeats: int) -> dict[str, float]:
  """Median wall time (ms) of each `fns[name] = (fn, args)`, runs interleaved case by case so
  that load from other processes falls on every case alike; a case that fails gets NaN."""
  failed = set()
  for name, (fn, args) in fns.items():
    try:
      for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    except Exception as err:  # noqa: BLE001  e.g. out of device memory: report, go on
      print(f"{name}: failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})")
      failed.add(name)
  times = {name: [float("nan")] for name in failed}
  times.update({name: [] for name in fns if name not in failed})
  for _ in range(repeats):
    for name, (fn, args) in fns.items():
      if name in failed:
        continue
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: 1e3 * statistics.median(t) for name, t in times.items()}


@dataclasses.dataclass
class Row:
  """One MoE shape: per case (`dense`, `dense_module`, `expert_floor`, `dropless/<backend>`,
  `capacity`) the median ms and the planned peak bytes; `flops` are the active FLOPs of one
  fwd+bwd step."""
  shape: str
  num_experts: int
  top_k: int
  expert_width: int
  dense_width: int
  flops: float
  ms: dict[str, float]
  peak_bytes: dict[str, int | None]

  def ratio(self, case: str, to: str = "dense") -> float:
    return self.ms[case] / self.ms[to]

  def gflops(self, case: str) -> float:
    return self.flops / (self.ms[case] * 1e-3) / 1e9


def run_shape(name: str, num_experts: int, top_k: int, granularity: int, args) -> Row:
  """Compiles and times every case of one MoE shape."""
  dtype = jnp.dtype(args.dtype)
  x = jax.random.normal(jax.random.key(1), (1, args.tokens, args.d_model), dtype)   # [1, T, D]
  fns = {}
  m = None
  cases = [("dropless", b, False) for b in args.backends]
  cases += [("dropless", "chunked", True)] if "chunked" in args.backends else []
  for dispatch, backend, fused in cases + [("capacity", None, False)]:
    m = model_config(args.d_model, args.d_ff, num_experts, top_k, granularity, dispatch,
                     args.routing_group, args.capacity_factor, backend or "ragged_dot",
                     args.dtype)
    m.moe.fused_gather = fused
    fn, state = module_fwd_bwd(MoELayer(m, rngs=nnx.Rngs(0)))
    case = "capacity" if backend is None else f"dropless/{backend}" + ("+fused" if fused else "")
    fns[case] = (fn, (state, x))
  e, k, f = _dims(m)
  width = k * f                                   # the active expert width per token
  dense, w = dense_swiglu_fwd_bwd(args.d_model, width, dtype, jax.random.key(2))
  module, state = module_fwd_bwd(MLP(args.d_model, width, "swiglu", rngs=nnx.Rngs(0),
                                     dtype=dtype))
  floor = expert_floor_fwd_bwd(args.d_model, e, k, f, args.tokens, dtype, jax.random.key(3))
  fns = {"dense": (dense, (w, x[0])), "dense_module": (module, (state, x)),
         "expert_floor": floor, **fns}
  peaks = {c: peak_bytes(fn, a) for c, (fn, a) in fns.items()}
  ms = time_ms(fns, warmup=args.warmup, repeats=args.repeats)
  flops = 3 * 6.0 * args.tokens * args.d_model * width      # 3 matrices x (fwd + 2 bwd)
  return Row(name, e, k, f, width, flops, ms, peaks)


def format_table(rows: list[Row], args) -> str:
  """Markdown tables: per shape and case ms, GFLOP/s, x dense, peak MiB; then the ratio of
  every case to every other."""
  unit = "TFLOP/s" if jax.default_backend() != "cpu" else "GFLOP/s"
  scale = 1e-3 if unit == "TFLOP/s" else 1.0
  lines = [
      f"MoE layer fwd+bwd vs a dense SwiGLU with the same active FLOPs (T={args.tokens}, "
      f"D={args.d_model}, d_ff={args.d_ff}, {args.dtype}, capacity_factor={args.capacity_factor},"
      f" routing_group={args.routing_group}; median of {args.repeats} after {args.warmup} "
      f"warm-up; jax {jax.__version__}, {jax.default_backend()} "
      f"{jax.devices()[0].device_kind} x{jax.device_count()}, XLA_FLAGS="
      f"{os.environ.get('XLA_FLAGS', '')!r})",
      "",
      f"| shape | case | ms | {unit} | x dense | peak MiB |",
      "| --- | --- | --- | --- | --- | --- |",
  ]
  for r in rows:
    for c in r.ms:
      peak = r.peak_bytes.get(c)
      lines.append(f"| {r.shape} (E={r.num_experts} K={r.top_k} F={r.expert_width}, dense W="
                   f"{r.dense_width}) | {c} | {r.ms[c]:.1f} | {scale * r.gflops(c):.1f} | "
                   f"{r.ratio(c):.2f} | {'' if peak is None else f'{peak / 2**20:.0f}'} |")
  for r in rows:
    cases = list(r.ms)
    lines += ["", f"{r.shape}: row time / column time",
              "| | " + " | ".join(cases) + " |", "|---" * (len(cases) + 1) + "|"]
    for a in cases:
      lines.append(f"| {a} | " + " | ".join(f"{r.ratio(a, b):.2f}" for b in cases) + " |")
  return "\n".join(lines)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tokens", type=int, default=1024, help="T, tokens per batch")
  p.add_argument("--d_model", type=int, default=128, help="D, model width")
  p.add_argument("--d_ff", type=int, default=256, help="F, width of one granularity-1 expert")
  p.add_argument("--routing_group", "--group_size", type=int, default=128,
                 help="tokens routed together under capacity dispatch (must divide --tokens)")
  p.add_argument("--capacity_factor", type=float, default=1.25)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="compute dtype (parameters stay float32)")
  p.add_argument("--backends", nargs="+", default=None, choices=list(GMM_BACKENDS),
                 help="gmm backends to time under dropless dispatch (default: all; on the CPU "
                      "all but the interpreted `pallas`)")
  p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
  p.add_argument("--repeats", type=int, default=7, help="timed runs; the median is reported")
  p.add_argument("--warmup", type=int, default=2, help="untimed runs first (the first compiles)")
  p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
  p.add_argument("--issue", action="store_true",
                 help="T=4096, D=512, d_ff=1024 (issue 9's CPU shapes), 5 repeats")
  p.add_argument("--gpu", action="store_true",
                 help="T=16384, D=1024, d_ff=4096, routing_group=512, bfloat16, 20 repeats, on "
                      "the default JAX backend (otherwise the CPU is forced)")
  p.add_argument("--json", default=None, help="also write the rows to this JSON file")
  args = p.parse_args(argv)
  if args.quick:
    args.tokens, args.d_model, args.d_ff, args.routing_group = 128, 32, 64, 64
    args.repeats, args.warmup = 3, 1
  if args.issue:
    args.tokens, args.d_model, args.d_ff, args.routing_group = 4096, 512, 1024, 128
    args.repeats = 5
  if args.gpu:
    args.tokens, args.d_model, args.d_ff, args.routing_group = 16384, 1024, 4096, 512
    args.dtype, args.repeats, args.warmup = "bfloat16", 20, 3
  if args.backends is None:
    args.backends = [b for b in GMM_BACKENDS
                     if not (b == "pallas" and jax.default_backend() == "cpu")]
  if args.tokens % args.routing_group:
    p.error(f"--routing_group={args.routing_group} must divide --tokens={args.tokens}")
  if args.d_ff % 8:
    p.error(f"--d_ff={args.d_ff} must be a multiple of 8 (the granularity of the fine shape)")
  return args


def main(argv=None) -> list[Row]:
  args = parse_args(argv)
  start = time.perf_counter()
  rows = [run_shape(name, *SHAPES[name], args) for name in args.shapes]
  print(format_table(rows, args))
  if jax.default_backend() == "gpu":
    stats = jax.devices()[0].memory_stats() or {}
    print(f"device peak_bytes_in_use: {stats.get('peak_bytes_in_use', 0) / 2**20:.0f} MiB")
  print(f"total {time.perf_counter() - start:.1f} s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "jax": jax.__version__, "backend": jax.default_backend(),
                 "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
