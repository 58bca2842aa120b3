"""Speed of one MoE layer relative to a dense SwiGLU FFN with the same active FLOPs per token.

For each MoE shape this times forward+backward (`jax.value_and_grad` of a scalar loss with
respect to the layer's parameters *and* its input, under `jax.jit`) of
  - `moejax.layers.MoELayer` with dropless dispatch, once per registered grouped-matmul backend
    (`moejax.kernels.GMM_BACKENDS`: `ragged_dot` is `jax.lax.ragged_dot`, `blocked` the
    MegaBlocks-style padded row tiles of arXiv:2211.15841),
  - the same layer with capacity dispatch (GShard one-hot einsums, arXiv:2006.16668),
  - a dense SwiGLU FFN (`moejax.experts.MLP`, arXiv:2002.05202) of width K*G * F/G, which does
    the same expert FLOPs per token as the MoE layer (the "active" FLOPs),
all in the same process, and prints MoE time / dense time (1.0 would be a free router and free
dispatch) together with the absolute milliseconds.

Shapes (E, K after granularity G is applied; "Scaling Laws for Fine-Grained Mixture of Experts",
Krajewski et al. 2024, arXiv:2402.07871):
  - E=8,  K=2, expert width F        (Mixtral-like; dense width 2F)
  - E=64, K=8, expert width F/8      (num_experts=8, top_k=1, granularity=8; dense width F)

    python benchmarks/moe_layer.py            # default sizes, about a minute on 2 CPU cores
    python benchmarks/moe_layer.py --quick    # tiny sizes, a smoke test (seconds)
    python benchmarks/moe_layer.py --gpu      # T=16384, D=1024, F=4096, bfloat16: fills one GPU
    python benchmarks/moe_layer.py --backends blocked   # only some gmm backends
"""
from __future__ import annotations

import argparse
import dataclasses
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
from moejax.config import moe_dims  # noqa: E402
from moejax.experts import MLP  # noqa: E402
from moejax.kernels import GMM_BACKENDS  # noqa: E402
from moejax.layers import MoELayer  # noqa: E402

# name -> (num_experts, top_k, granularity) before granularity is applied.
SHAPES = {
    "E=8 K=2": (8, 2, 1),
    "E=64 K=8 (G=8)": (8, 1, 8),
}


def load_default_config():
  """configs/default.py's `get_config()`."""
  return load_config_file(os.path.join(REPO, "configs", "default.py"))


def model_config(d_model: int, d_ff: int, num_experts: int, top_k: int, granularity: int,
                 dispatch: str, group_size: int, capacity_factor: float,
                 gmm_backend: str = "ragged_dot", dtype: str = "float32"):
  """The default `config.model` with the MoE fields of one benchmark case overridden
  (parameters stay float32; `dtype` is the compute dtype)."""
  m = load_default_config().model
  m.d_model, m.d_ff, m.dtype = d_model, d_ff, dtype
  m.moe.num_experts, m.moe.top_k, m.moe.granularity = num_experts, top_k, granularity
  m.moe.dispatch, m.moe.group_size, m.moe.capacity_factor = dispatch, group_size, capacity_factor
  m.moe.gmm_backend = gmm_backend
  m.moe.num_shared_experts = 0
  return m


def fwd_bwd_fn(module: nnx.Module):
  """A jitted fn(state, x [1, T, D]) -> (loss, (d state, d x)) for `module`.

  The loss is mean(y^2) (+ the router's weighted aux loss for an MoE layer), so the backward pass
  reaches every parameter and the input, as inside a model.
  """
  graphdef, state = nnx.split(module)

  def loss_fn(state, x):
    out = nnx.merge(graphdef, state)(x)
    if isinstance(out, tuple):                 # MoELayer: (y, aux_loss, metrics)
      y, aux, _ = out
      return jnp.mean(jnp.square(y.astype(jnp.float32))) + aux
    return jnp.mean(jnp.square(out.astype(jnp.float32)))

  return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1))), state


def time_ms(fns: dict, *, warmup: int, repeats: int) -> dict[str, float]:
  """Median wall time in milliseconds of each `fns[name] = (fn, args)` over `repeats` runs.

  `warmup` untimed runs of each come first (the first compiles). The timed runs are interleaved
  (dense, dropless, capacity, dense, ...) so that load from other processes on a shared machine
  falls on every case alike and the ratios stay fair. Every run waits for its result. A case
  that fails (e.g. out of device memory) is reported and gets NaN.
  """
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
  """One benchmark case: absolute times (ms) by case name (`dense`, `capacity`, and
  `dropless/<gmm backend>` for each backend) and ratios to the dense FFN."""
  shape: str
  num_experts: int
  top_k: int
  expert_width: int
  dense_width: int
  ms: dict[str, float]

  def ratio(self, case: str) -> float:
    """MoE time / dense time for `case`."""
    return self.ms[case] / self.ms["dense"]


def run_shape(name: str, num_experts: int, top_k: int, granularity: int, args) -> Row:
  """Times dense, capacity and dropless (every backend) for one MoE shape at `args`' sizes."""
  x = jax.random.normal(jax.random.key(1), (1, args.tokens, args.d_model), args.dtype)  # [1,T,D]
  cases = [("dropless", b) for b in args.backends] + [("capacity", "ragged_dot")]
  fns, dims = {}, None
  for dispatch, backend in cases:
    m = model_config(args.d_model, args.d_ff, num_experts, top_k, granularity, dispatch,
                     args.group_size, args.capacity_factor, backend, args.dtype)
    dims = moe_dims(m)
    fn, state = fwd_bwd_fn(MoELayer(m, rngs=nnx.Rngs(0)))
    fns[dispatch if dispatch == "capacity" else f"dropless/{backend}"] = (fn, (state, x))
  dense_width = dims.top_k * dims.expert_width   # K*G * F/G: the active expert width per token
  fn, state = fwd_bwd_fn(MLP(args.d_model, dense_width, "swiglu", rngs=nnx.Rngs(0),
                             dtype=jnp.dtype(args.dtype)))
  fns = {"dense": (fn, (state, x)), **fns}
  ms = time_ms(fns, warmup=args.warmup, repeats=args.repeats)
  return Row(name, dims.num_experts, dims.top_k, dims.expert_width, dense_width, ms)


def format_table(rows: list[Row], args) -> str:
  """The results as a fixed-width text table (ms, then x dense) with notes."""
  cases = [c for c in rows[0].ms if c != "dense"]
  label = lambda c: c.split("/")[-1]            # dropless/<backend> -> <backend>
  width = {c: max(len(label(c)) + 5, 11) for c in cases}
  head = ("".join(f"{label(c) + ' ms':>{width[c]}}" for c in cases)
          + "".join(f"{label(c) + ' x':>{width[c]}}" for c in cases))
  lines = [
      f"MoE layer fwd+bwd vs dense SwiGLU FFN with the same active FLOPs/token "
      f"(T={args.tokens}, D={args.d_model}, d_ff={args.d_ff}, {args.dtype}, capacity_factor="
      f"{args.capacity_factor}, group_size={args.group_size}, median of {args.repeats} after "
      f"{args.warmup} warm-up; jax {jax.__version__}, backend {jax.default_backend()}, "
      f"{jax.devices()[0].device_kind}, {jax.device_count()} device(s))",
      f"{'shape':<16}{'E':>4}{'K':>4}{'F/G':>6}{'dense W':>9}{'dense ms':>10}" + head,
  ]
  for r in rows:
    lines.append(
        f"{r.shape:<16}{r.num_experts:>4}{r.top_k:>4}{r.expert_width:>6}{r.dense_width:>9}"
        f"{r.ms['dense']:>10.2f}" + "".join(f"{r.ms[c]:>{width[c]}.2f}" for c in cases)
        + "".join(f"{r.ratio(c):>{width[c]}.2f}" for c in cases))
  lines += [
      "notes:",
      "  ms: median wall time; x: MoE time / dense time (1.0: routing and dispatch cost nothing).",
      "  ragged_dot, blocked: dropless dispatch with that gmm backend; capacity: capacity",
      "  dispatch.",
      "  ragged_dot: jax.lax.ragged_dot; on the CPU (and the GPU, jax 0.11.2) it is lowered to a",
      "  dense computation over all E experts for every row (E times the active FLOPs).",
      "  blocked: rows padded per expert to a multiple of a row tile tm, one batched",
      "  matmul over tiles; at most min(E, T*K)*(tm-1) padding rows (moejax/kernels/blocked.py).",
      "  capacity does E*C = capacity_factor*T*K expert rows (capacity_factor times the active",
      "  FLOPs) plus one-hot dispatch/combine einsums of O(T*E*C*D) per group.",
  ]
  return "\n".join(lines)


def parse_args(argv=None):
  """Command-line flags; --quick shrinks everything to a seconds-long smoke run, --gpu grows
  it to fill one accelerator."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tokens", type=int, default=1024, help="T, tokens per batch")
  p.add_argument("--d_model", type=int, default=128, help="D, model width")
  p.add_argument("--d_ff", type=int, default=256, help="F, width of one granularity-1 expert")
  p.add_argument("--group_size", type=int, default=128,
                 help="tokens routed together under capacity dispatch (must divide --tokens)")
  p.add_argument("--capacity_factor", type=float, default=1.25)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="compute dtype (parameters stay float32)")
  p.add_argument("--backends", nargs="+", default=list(GMM_BACKENDS), choices=list(GMM_BACKENDS),
                 help="grouped-matmul backends to time under dropless dispatch (default: all)")
  p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
  p.add_argument("--repeats", type=int, default=7, help="timed runs; the median is reported")
  p.add_argument("--warmup", type=int, default=2, help="untimed runs first (the first compiles)")
  p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
  p.add_argument("--gpu", action="store_true",
                 help="T=16384, D=1024, d_ff=4096, group_size=512, bfloat16, 20 repeats; runs on "
                      "the default JAX backend (otherwise the CPU is forced)")
  args = p.parse_args(argv)
  if args.quick:
    args.tokens, args.d_model, args.d_ff, args.group_size = 128, 32, 64, 64
    args.repeats, args.warmup = 3, 1
  if args.gpu:
    args.tokens, args.d_model, args.d_ff, args.group_size = 16384, 1024, 4096, 512
    args.dtype, args.repeats, args.warmup = "bfloat16", 20, 3
  if args.tokens % args.group_size:
    p.error(f"--group_size={args.group_size} must divide --tokens={args.tokens}")
  if args.d_ff % 8:
    p.error(f"--d_ff={args.d_ff} must be a multiple of 8 (the granularity of the E=64 shape)")
  return args


def main(argv=None) -> list[Row]:
  """Runs every shape and prints the table; returns the rows."""
  args = parse_args(argv)
  start = time.perf_counter()
  rows = [run_shape(name, *SHAPES[name], args) for name in args.shapes]
  print(format_table(rows, args))
  print(f"total {time.perf_counter() - start:.1f} s")
  return rows


if __name__ == "__main__":
  main()
