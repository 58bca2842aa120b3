"""Speed of one MoE layer relative to a dense SwiGLU FFN with the same active FLOPs per token.

For each MoE shape this times forward+backward (`jax.value_and_grad` of a scalar loss with
respect to the layer's parameters *and* its input, under `jax.jit`) of
  - `moejax.layers.MoELayer` with dropless dispatch (sort + `jax.lax.ragged_dot`),
  - the same layer with capacity dispatch (GShard one-hot einsums, arXiv:2006.16668),
  - a dense SwiGLU FFN (`moejax.experts.MLP`, arXiv:2002.05202) of width K*G * F/G, which does
    the same expert FLOPs per token as the MoE layer (the "active" FLOPs),
all in the same process, and prints MoE time / dense time (1.0 would be a free router and free
dispatch) together with the absolute milliseconds.

Shapes (E, K after granularity G is applied; "Scaling Laws for Fine-Grained Mixture of Experts",
Krajewski et al. 2024, arXiv:2402.07871):
  - E=8,  K=2, expert width F        (Mixtral-like; dense width 2F)
  - E=64, K=8, expert width F/8      (num_experts=8, top_k=1, granularity=8; dense width F)

    python benchmarks/moe_layer.py            # default sizes, about 1-2 minutes on 2 CPU cores
    python benchmarks/moe_layer.py --quick    # tiny sizes, a smoke test (seconds)
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from moejax.config import moe_dims  # noqa: E402
from moejax.experts import MLP  # noqa: E402
from moejax.layers import MoELayer  # noqa: E402

# name -> (num_experts, top_k, granularity) before granularity is applied.
SHAPES = {
    "E=8 K=2": (8, 2, 1),
    "E=64 K=8 (G=8)": (8, 1, 8),
}


def load_default_config():
  """configs/default.py's `get_config()`, loaded by path (configs/ is not a package)."""
  spec = importlib.util.spec_from_file_location("moejax_default_config",
                                                os.path.join(REPO, "configs", "default.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def model_config(d_model: int, d_ff: int, num_experts: int, top_k: int, granularity: int,
                 dispatch: str, group_size: int, capacity_factor: float):
  """The default `config.model` with the MoE fields of one benchmark case overridden."""
  m = load_default_config().model
  m.d_model, m.d_ff = d_model, d_ff
  m.moe.num_experts, m.moe.top_k, m.moe.granularity = num_experts, top_k, granularity
  m.moe.dispatch, m.moe.group_size, m.moe.capacity_factor = dispatch, group_size, capacity_factor
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
      return jnp.mean(jnp.square(y)) + aux
    return jnp.mean(jnp.square(out))

  return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1))), state


def time_ms(fns: dict, *, warmup: int, repeats: int) -> dict[str, float]:
  """Median wall time in milliseconds of each `fns[name] = (fn, args)` over `repeats` runs.

  `warmup` untimed runs of each come first (the first compiles). The timed runs are interleaved
  (dense, dropless, capacity, dense, ...) so that load from other processes on a shared machine
  falls on every case alike and the ratios stay fair. Every run waits for its result.
  """
  for fn, args in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn(*args))
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, (fn, args) in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: 1e3 * statistics.median(t) for name, t in times.items()}


@dataclasses.dataclass
class Row:
  """One benchmark case: absolute times (ms) and ratios to the dense FFN."""
  shape: str
  num_experts: int
  top_k: int
  expert_width: int
  dense_width: int
  dense_ms: float
  dropless_ms: float
  capacity_ms: float

  @property
  def dropless_ratio(self) -> float:
    """Dropless MoE time / dense time."""
    return self.dropless_ms / self.dense_ms

  @property
  def capacity_ratio(self) -> float:
    """Capacity MoE time / dense time."""
    return self.capacity_ms / self.dense_ms


def run_shape(name: str, num_experts: int, top_k: int, granularity: int, args) -> Row:
  """Times dense, dropless and capacity for one MoE shape at the sizes in `args`."""
  x = jax.random.normal(jax.random.key(1), (1, args.tokens, args.d_model), jnp.float32)  # [1,T,D]
  fns, dims = {}, None
  for dispatch in ("dropless", "capacity"):
    m = model_config(args.d_model, args.d_ff, num_experts, top_k, granularity, dispatch,
                     args.group_size, args.capacity_factor)
    dims = moe_dims(m)
    fn, state = fwd_bwd_fn(MoELayer(m, rngs=nnx.Rngs(0)))
    fns[dispatch] = (fn, (state, x))
  dense_width = dims.top_k * dims.expert_width   # K*G * F/G: the active expert width per token
  fn, state = fwd_bwd_fn(MLP(args.d_model, dense_width, "swiglu", rngs=nnx.Rngs(0)))
  fns["dense"] = (fn, (state, x))
  ms = time_ms(fns, warmup=args.warmup, repeats=args.repeats)
  return Row(name, dims.num_experts, dims.top_k, dims.expert_width, dense_width, ms["dense"],
             ms["dropless"], ms["capacity"])


def format_table(rows: list[Row], args) -> str:
  """The results as a fixed-width text table with notes."""
  lines = [
      f"MoE layer fwd+bwd vs dense SwiGLU FFN with the same active FLOPs/token "
      f"(T={args.tokens}, D={args.d_model}, d_ff={args.d_ff}, capacity_factor="
      f"{args.capacity_factor}, group_size={args.group_size}, median of {args.repeats}; "
      f"backend {jax.default_backend()}, {jax.device_count()} device(s))",
      f"{'shape':<16}{'E':>4}{'K':>4}{'F/G':>6}{'dense W':>9}{'dense ms':>10}"
      f"{'dropless ms':>13}{'capacity ms':>13}{'dropless x':>12}{'capacity x':>12}",
  ]
  for r in rows:
    lines.append(
        f"{r.shape:<16}{r.num_experts:>4}{r.top_k:>4}{r.expert_width:>6}{r.dense_width:>9}"
        f"{r.dense_ms:>10.2f}{r.dropless_ms:>13.2f}{r.capacity_ms:>13.2f}"
        f"{r.dropless_ratio:>12.2f}{r.capacity_ratio:>12.2f}")
  lines += [
      "notes:",
      "  ratio = MoE time / dense time; 1.0 means routing and dispatch cost nothing.",
      "  dropless uses jax.lax.ragged_dot; on the CPU it is lowered to a dense computation over",
      "  all E experts for every row (E times the active FLOPs), so dropless ratios on the CPU",
      "  grow with E and say little about a GPU/TPU grouped matmul (the kernels issue adds a",
      "  fast path).",
      "  capacity does E*C = capacity_factor*T*K expert rows (capacity_factor times the active",
      "  FLOPs) plus one-hot dispatch/combine einsums of O(T*E*C*D) per group.",
  ]
  return "\n".join(lines)


def parse_args(argv=None):
  """Command-line flags; --quick shrinks everything to a seconds-long smoke run."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tokens", type=int, default=1024, help="T, tokens per batch")
  p.add_argument("--d_model", type=int, default=128, help="D, model width")
  p.add_argument("--d_ff", type=int, default=256, help="F, width of one granularity-1 expert")
  p.add_argument("--group_size", type=int, default=128,
                 help="tokens routed together under capacity dispatch (must divide --tokens)")
  p.add_argument("--capacity_factor", type=float, default=1.25)
  p.add_argument("--repeats", type=int, default=7, help="timed runs; the median is reported")
  p.add_argument("--warmup", type=int, default=2, help="untimed runs first (the first compiles)")
  p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
  args = p.parse_args(argv)
  if args.quick:
    args.tokens, args.d_model, args.d_ff, args.group_size = 128, 32, 64, 64
    args.repeats, args.warmup = 3, 1
  if args.tokens % args.group_size:
    p.error(f"--group_size={args.group_size} must divide --tokens={args.tokens}")
  if args.d_ff % 8:
    p.error(f"--d_ff={args.d_ff} must be a multiple of 8 (the granularity of the E=64 shape)")
  return args


def main(argv=None) -> list[Row]:
  """Runs every shape and prints the table; returns the rows."""
  args = parse_args(argv)
  start = time.perf_counter()
  rows = [run_shape(name, *shape, args) for name, shape in SHAPES.items()]
  print(format_table(rows, args))
  print(f"total {time.perf_counter() - start:.1f} s")
  return rows


if __name__ == "__main__":
  main()
