"""moejax's MoE layer against transformers' Mixtral sparse MoE block on the CPU, same shapes,
same process, runs interleaved.

Times forward+backward (loss mean(y^2), gradients of the weights and the input) of
  - transformers' `MixtralSparseMoeBlock` ("Mixtral of Experts", Jiang et al. 2024,
    arXiv:2401.04088) with each experts implementation given in --torch_impls
    (default `grouped_mm` and `eager`), torch on all cores,
  - the plain-JAX dense SwiGLU with the same active FLOPs (`benchmarks/moe_layer.py`'s baseline),
  - moejax's `MoELayer`, dropless, with each gmm backend in --backends (default `chunked`,
    `blocked`),
at issue 9's shapes (T=4096, D=512; coarse E=8 K=2 F=1024, fine E=64 K=8 F=128), float32.

Needs torch and transformers, which moejax does not depend on. On the CPU install the CPU build
of torch only: `pip install torch==2.13.0` (a bare `pip install torch` pulls a CUDA build of
several GB) and `pip install transformers`. Exits with a note when they are missing.

    python benchmarks/vs_torch.py --repeats 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# (E, K, F) after granularity.
SHAPES = {"coarse E=8 K=2": (8, 2, 1024), "fine E=64 K=8": (64, 8, 128)}


def torch_case(t, d, e, k, f, impl):
  """A closure running one fwd+bwd of transformers' Mixtral block."""
  import torch  # noqa: PLC0415
  from transformers import MixtralConfig  # noqa: PLC0415
  from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: PLC0415

  cfg = MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=e,
                      num_experts_per_tok=k, experts_implementation=impl)
  block = MixtralSparseMoeBlock(cfg).float()
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in block.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
  block.train()
  x = torch.randn(1, t, d, generator=gen, requires_grad=True)

  def run():
    block.zero_grad(set_to_none=True)
    x.grad = None
    y = block(x)
    (y * y).mean().backward()
  return run


def jax_cases(t, d, shape, backends):
  """Closures for the dense baseline and the moejax layer per backend."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  import moe_layer  # noqa: PLC0415  benchmarks/moe_layer.py

  ne, top_k, gran = moe_layer.SHAPES[shape]
  x = jax.random.normal(jax.random.key(1), (1, t, d), jnp.float32)
  cases = {}
  m = None
  for b in backends:
    m = moe_layer.model_config(d, 1024, ne, top_k, gran, "dropless", 128, 1.25, b)
    fn, state = moe_layer.module_fwd_bwd(moe_layer.MoELayer(m, rngs=nnx.Rngs(0)))
    cases[f"moejax/{b}"] = (fn, (state, x))
  _, k, f = moe_layer._dims(m)
  dense, w = moe_layer.dense_swiglu_fwd_bwd(d, k * f, jnp.float32, jax.random.key(2))
  cases = {"jax dense SwiGLU": (dense, (w, x[0])), **cases}
  return {n: (lambda fn=fn, a=a: jax.block_until_ready(fn(*a))) for n, (fn, a) in cases.items()}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tokens", type=int, default=4096)
  p.add_argument("--d_model", type=int, default=512)
  p.add_argument("--torch_impls", nargs="+", default=["grouped_mm", "eager"])
  p.add_argument("--backends", nargs="+", default=["chunked", "blocked"])
  p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  args = p.parse_args(argv)
  try:
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
  except ImportError as err:
    print(f"vs_torch: {err.name} is not installed; `pip install torch==2.13.0 transformers` "
          "(the CPU build of torch) to run this comparison.")
    return
  import jax  # noqa: PLC0415
  print(f"fwd+bwd ms, T={args.tokens}, D={args.d_model}, float32, median of {args.repeats}; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
        f"{transformers.__version__}, jax {jax.__version__}\n")
  print("| shape | case | ms | x jax dense |\n| --- | --- | --- | --- |")
  for shape in args.shapes:
    e, k, f = SHAPES[shape]
    runs = jax_cases(args.tokens, args.d_model, shape, args.backends)
    for impl in args.torch_impls:
      try:
        runs[f"transformers Mixtral/{impl}"] = torch_case(args.tokens, args.d_model, e, k, f,
                                                         impl)
      except Exception as err:  # noqa: BLE001  an implementation this version lacks
        print(f"| {shape} | transformers Mixtral/{impl} | failed: {type(err).__name__}: "
              f"{str(err).splitlines()[0][:120]} | |")
    for run in runs.values():
      for _ in range(args.warmup):
        run()
    times = {n: [] for n in runs}
    for _ in range(args.repeats):
      for n, run in runs.items():
        start = time.perf_counter()
        run()
        times[n].append(time.perf_counter() - start)
    ms = {n: 1e3 * statistics.median(t) for n, t in times.items()}
    for n, v in ms.items():
      print(f"| {shape} | {n} | {v:.1f} | {v / ms['jax dense SwiGLU']:.2f} |")


if __name__ == "__main__":
  main()
