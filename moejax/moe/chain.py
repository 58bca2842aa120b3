"""Chain-of-Experts: C routed iterations over one shared expert bank inside an MoE layer.

"Chain-of-Experts: Unlocking the Communication Power of Mixture-of-Experts Models", Wang et al.
2025, arXiv:2506.18945. With the layer's input x^(0) = x [T, D] (the block's normed hidden
state), iteration t = 1..C routes x^(t-1) with its own router G_t and adds the experts' output
to it (the paper's inner residual):
    x^(t) = sum_i g_{t,i}(x^(t-1)) E_i(x^(t-1)) + x^(t-1),
where g_t is the top-K decision of router t and E_i are the same experts (and shared experts)
in every iteration. The layer returns
    y = x^(C) - x^(0) = sum_t MoE_t(x^(t-1)),
which the block adds to its residual stream as for any FFN (x + y), so C = 1 is exactly the
plain layer. (In the authors' code, `residual="inner"`, the block keeps x^(C) itself, the
normed input included, in place of the pre-norm residual; here the pre-norm residual stream is
kept.) `model.moe.chain_iterations` = C; iteration 1 uses the layer's own router, so C = 1 has
the parameter tree of the plain layer. Each iteration routes K = top_k * G experts: the paper's
CoE-C(K/E) is top_k = K with C iterations, C times the expert FLOPs of one top-K pass.

Across iterations: the weighted auxiliary losses add up (each router carries its own balance
loss, as each iteration's gate adds its own in the authors' code); the metrics are averaged,
except `experts_per_token`, which adds up (real-expert FFNs computed per token over the chain),
and each iteration's load is kept as `load_iter<t>` (t from 0) for its router's state update.
The routing carry runs through the iterations (router t sees router t-1's state) and the last
one's is handed to the next MoE layer.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def run_chain(step: Callable, x: jax.Array, routers: list, *, rng: jax.Array | None,
              carry: dict):
  """Runs C = len(routers) iterations of `step`.

  Args:
    step: (x [T, D], router, rng, carry) -> (y [T, D], weighted aux loss, metrics, carry), one
      routed MoE pass.
    x: [T, D] the layer input x^(0).
    routers: the C routers, the layer's own first.
    rng: the layer's key (iteration 0 uses it as is, iteration t > 0 folds in t), or None.
    carry: the routing state from the previous MoE layer.
  Returns:
    (y = x^(C) - x^(0) [T, D], summed aux loss, combined metrics, carry).
  """
  h, outputs, losses, metrics = x, [], [], []
  for t, router in enumerate(routers):
    key = rng if rng is None or t == 0 else jax.random.fold_in(rng, t)
    y_t, loss_t, metrics_t, carry = step(h, router, key, carry)
    outputs.append(y_t)
    losses.append(loss_t)
    metrics.append(metrics_t)
    h = h + y_t.astype(h.dtype)
  return sum(outputs[1:], outputs[0]), sum(losses[1:], losses[0]), combine_metrics(metrics), carry


def combine_metrics(per_iteration: list[dict]) -> dict:
  """[{name: array}] of the C iterations -> {name: mean over iterations} with
  `experts_per_token` summed and `load_iter<t>` = iteration t's `load`."""
  out = {}
  for name in per_iteration[0]:
    stacked = jnp.stack([jnp.asarray(m[name], jnp.float32) for m in per_iteration])
    out[name] = jnp.sum(stacked, 0) if name == "experts_per_token" else jnp.mean(stacked, 0)
  for t, m in enumerate(per_iteration):
    out[f"load_iter{t}"] = m["load"]
  return out
