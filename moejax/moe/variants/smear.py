"""SMEAR: the router's probabilities average the experts' parameters into one merged expert.

"Soft Merging of Experts with Adaptive Routing", Muqeeth, Liu & Raffel 2023, arXiv:2306.03745.
The paper routes per example: the router reads the average of the example's token
representations and one merged expert processes all of them. In a decoder LM the average of a
whole sequence holds the tokens to be predicted, so moejax offers two readings
(`model.moe.smear_routing`):

- `prefix` (default): causal. Token t is processed by the expert merged for the mean of its
  segment's tokens up to t (the example as seen so far). The merged expert differs per token;
  it is applied by linearity, sum_e p_te (x W_e), which costs E expert FFNs per token (dense
  compute, exact).
- `sequence`: the paper's per-example merge, one merged expert per row from the mean of the
  row's tokens: one expert FFN per token plus the merge. NOT CAUSAL: every token's routing reads
  the later tokens of its row, so an LM's loss leaks the future.

Both are batch-independent.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from moejax.errors import ConfigError
from moejax.moe.balance import entropy, usage_metrics
from moejax.moe.experts import FFN_FORMS, shared_experts
from moejax.moe.layer import MoEFFN
from moejax.moe.variants import MOE_LAYERS
from moejax.moe.variants.mixing import expert_bank, linear_gate, refuse_router_options

SMEAR_ROUTINGS = ("prefix", "sequence")


def merge_experts(probs: jax.Array, w: dict) -> dict:
  """SMEAR's merged expert (arXiv:2306.03745): W-bar = sum_e p_e W_e, per row of
  `probs`. probs: [N, E], w: {name: [E, ...]} -> {name: [N, ...]}, float32 accumulation."""
  return {n: jnp.einsum("ne,e...->n...", probs.astype(jnp.float32), v.astype(jnp.float32))
          for n, v in w.items()}


def smear_per_row(x: jax.Array, probs: jax.Array, w: dict, form: str, dtype) -> jax.Array:
  """One merged expert per row: x [B, S, D], probs [B, E] -> f(x; sum_e p_be W_e) [B, S, D],
  f the FFN form `form` (`FFN_FORMS`) computed in `dtype`."""
  merged = {n: v.astype(dtype) for n, v in merge_experts(probs, w).items()}
  matmul = lambda a, m: jnp.einsum("bsi,bio->bso", a, m)
  return FFN_FORMS[form].apply(x.astype(dtype), merged, matmul)


def smear_per_token(x: jax.Array, probs: jax.Array, w: dict, form: str, dtype) -> jax.Array:
  """One merged expert per token: x [T, D], probs [T, E] -> f(x_t; sum_e p_te W_e) [T, D].

  Each matrix product with a merged weight is x (sum_e p_te W_e) = sum_e p_te (x W_e): the
  same numbers as merging per token, without a [T, D, F] weight per token, at E times the FLOPs
  of one expert."""
  p = probs.astype(dtype)
  matmul = lambda a, m: jnp.einsum("ti,eio,te->to", a, m, p)
  return FFN_FORMS[form].apply(x.astype(dtype), {n: v.astype(dtype) for n, v in w.items()},
                               matmul)


def prefix_mean(x: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """Mean of each token's segment up to and including it: x [B, S, D], segment_ids [B, S] (0:
  padding, which counts nowhere; a token starts a segment where its id differs from the
  previous one) -> [B, S, D] float32. A segmented prefix sum (associative scan)."""
  m = (segment_ids > 0).astype(jnp.float32)
  start = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                           segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)

  def add(a, b):
    (av, ac, af), (bv, bc, bf) = a, b
    return (jnp.where(bf[..., None], bv, av + bv), jnp.where(bf, bc, ac + bc), af | bf)

  total, count, _ = jax.lax.associative_scan(
      add, (x.astype(jnp.float32) * m[..., None], m, start), axis=1)
  return total / jnp.maximum(count, 1.0)[..., None]


@MOE_LAYERS.register("smear")
class SMEAR(MoEFFN):
  """SMEAR ("Soft Merging of Experts with Adaptive Routing", Muqeeth et al. 2023,
  arXiv:2306.03745): a linear router W_r [D, E] with a softmax gives p = softmax(r W_r) from a
  summary r of the example; the E experts (`moe_dims`) are merged, W-bar = sum_e p_e W_e for
  every matrix of the FFN form, and the merged expert runs: y = f(x; W-bar).

  r per `model.moe.smear_routing` (module docstring): `prefix` (default) r_t = the mean of the
  token's segment up to t, causal, E expert FFNs of compute per token; `sequence` r = the mean
  of the row, NOT CAUSAL, one expert FFN per token. Batch-independent. Nothing is dropped; no
  auxiliary loss (the paper uses none).

  Metrics: `load` [E], the mean merge weight of each expert over the routed tokens; `max_vio`;
  `router_entropy`; `experts_per_token` = the expert FFNs computed per token (E for `prefix`, 1
  for `sequence`: one merged expert); `dropped_frac` = 0.
  """
  causal = True              # with the default `prefix` routing; `sequence` is not causal
  batch_independent = True

  @classmethod
  def check_config(cls, model: ml_collections.ConfigDict) -> None:
    routing = model.moe.get("smear_routing", "prefix")
    if routing not in SMEAR_ROUTINGS:
      raise ConfigError("model.moe.smear_routing", routing, f"one of {SMEAR_ROUTINGS}")
    refuse_router_options(model, "smear")

  def __init__(self, model: ml_collections.ConfigDict, *, rngs: nnx.Rngs,
               mesh: Mesh | None = None):
    del mesh
    self.routing = model.moe.get("smear_routing", "prefix")
    self.causal = self.routing == "prefix"
    self.gate = linear_gate(model, rngs)
    self.experts = expert_bank(model, rngs)
    self.shared = shared_experts(model, rngs)

  def forward(self, x, segment_ids=None, *, train=False, rng=None, token_ids=None, carry=None):
    """x: [B, S, D], segment_ids: [B, S] (0: padding) -> (y [B, S, D], aux loss 0, metrics,
    `carry` unchanged)."""
    del train, rng, token_ids
    b, s, d = x.shape
    if segment_ids is None:
      segment_ids = jnp.ones((b, s), jnp.int32)
    m = (segment_ids > 0).astype(jnp.float32)
    gate = self.gate[...].astype(jnp.float32)
    w, ffn = self.experts.weights(), self.experts.ffn
    if self.routing == "prefix":
      probs = jax.nn.softmax(prefix_mean(x, segment_ids) @ gate, axis=-1)          # [B, S, E]
      y = smear_per_token(x.reshape(b * s, d), probs.reshape(b * s, -1), w, ffn.form,
                          ffn.dtype).reshape(b, s, d)
    else:
      mean = (jnp.einsum("bsd,bs->bd", x.astype(jnp.float32), m)
              / jnp.maximum(jnp.sum(m, axis=1), 1.0)[:, None])
      row_probs = jax.nn.softmax(mean @ gate, axis=-1)                             # [B, E]
      y = smear_per_row(x, row_probs, w, ffn.form, ffn.dtype)
      probs = jnp.broadcast_to(row_probs[:, None], (b, s, row_probs.shape[-1]))
    if self.shared is not None:
      y = y + self.shared(x).astype(y.dtype)
    tokens = jnp.maximum(jnp.sum(m), 1.0)
    metrics = {**usage_metrics(jnp.einsum("bse,bs->e", probs, m)),
               "router_entropy": jnp.sum(entropy(probs) * m) / tokens,
               # Expert FFNs computed per token: E by linearity (prefix), one merged (sequence).
               "experts_per_token": jnp.asarray(
                   probs.shape[-1] if self.routing == "prefix" else 1, jnp.float32),
               "dropped_frac": jnp.zeros((), jnp.float32)}
    return y.astype(x.dtype), jnp.zeros((), jnp.float32), metrics, carry or {}
