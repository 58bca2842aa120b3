"""Soft MoE: each expert's slots are learned mixtures of all the tokens of a sequence.

"From Sparse to Soft Mixtures of Experts", Puigcerver et al. 2023, arXiv:2308.00951.

NOT CAUSAL. A slot mixes every token of its sequence, later ones included, so in a decoder LM
a token's output depends on the tokens it is trained to predict: the LM loss of a Soft MoE
model leaks the future and is not comparable to a causal model's, and the model cannot sample
one token at a time. Use it to study the layer, not as an LM. Batch-independent: the slots of a
row are formed from that row alone (packed documents of one row do mix with each other).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from moejax.moe.balance import entropy, usage_metrics
from moejax.moe.dims import moe_dims
from moejax.moe.experts import ExpertFFN, shared_experts
from moejax.moe.layer import MoEFFN
from moejax.moe.variants import MOE_LAYERS
from moejax.moe.variants.mixing import check_int, expert_bank, masked_softmax, refuse_router_options
from moejax.params import logical_param


def soft_moe(x: jax.Array, token_mask: jax.Array, phi: jax.Array, w: dict,
             ffn: ExpertFFN) -> tuple[jax.Array, jax.Array]:
  """Soft MoE over each row (arXiv:2308.00951, its Algorithm 1).

  With the m tokens X [m, D] of a row, n = E experts of p slots each and Phi [D, n p]:
      logits = X Phi                                  [m, n p]
      D_ij = exp(logits_ij) / sum_i' exp(logits_i'j)  dispatch weights: softmax over tokens
      C_ij = exp(logits_ij) / sum_j' exp(logits_ij')  combine weights: softmax over slots
      X~ = D^T X                                      [n p, D] slot inputs
      Y~_s = f_{floor(s/p)}(X~_s)                     expert e processes its p slots
      Y = C Y~                                        [m, D]
  Padding tokens (mask False) take no part in any slot and get output 0. The paper's l2
  normalisation of X and Phi, for large D, is not applied. Router math in float32.

  Args:
    x: [B, S, D]; token_mask: [B, S] bool; phi: [D, E, P]; w: the bank's weights {name: [E, D,
      F] / [E, F, D]}; ffn: how to apply them (`ExpertFFN.batched`).
  Returns:
    (y [B, S, D] in x.dtype, combine weights [B, S, E, P] float32).
  """
  b, s, d = x.shape
  _, e, p = phi.shape
  xf = x.astype(jnp.float32)
  logits = jnp.einsum("bsd,dep->bsep", xf, phi.astype(jnp.float32))
  valid = token_mask[:, :, None, None]
  dispatch = masked_softmax(logits, valid, axis=1)                               # over tokens
  combine = masked_softmax(logits.reshape(b, s, e * p), token_mask[:, :, None],
                           axis=-1).reshape(b, s, e, p)                           # over slots
  slots = jnp.einsum("bsep,bsd->ebpd", dispatch, xf)                             # [E, B, P, D]
  ys = ffn.batched(slots.reshape(e, b * p, d), w).reshape(e, b, p, d)
  y = jnp.einsum("bsep,ebpd->bsd", combine, ys.astype(jnp.float32))
  return y.astype(x.dtype), combine


@MOE_LAYERS.register("soft")
class SoftMoE(MoEFFN):
  """Soft MoE ("From Sparse to Soft Mixtures of Experts", Puigcerver et al. 2023,
  arXiv:2308.00951): E experts (`moe_dims`: num_experts * granularity, width F) with P =
  `model.moe.soft_slots_per_expert` slots each; the equations are `soft_moe`'s.

  NOT CAUSAL: a slot mixes the whole row, later tokens included, so an LM's loss leaks the
  future (module docstring). Batch-independent. Nothing is dropped and no auxiliary loss is
  needed (the layer is fully differentiable). Cost: E * P expert FFNs per row of S tokens,
  whatever S, i.e. E P / S per token (the `experts_per_token` metric); P = K S / E matches a
  top-K layer's compute.

  Metrics: `load` [E], each expert's share of the combine weights over the routed tokens (every
  expert processes exactly P slots; this is how much the tokens use its outputs), `max_vio`,
  `router_entropy` (of the combine weights over the E P slots), `experts_per_token` (expert FFN
  evaluations per routed token), `dropped_frac` = 0.
  """
  causal = False
  batch_independent = True

  @classmethod
  def check_config(cls, model: ml_collections.ConfigDict) -> None:
    check_int(model, "soft_slots_per_expert", 1, 1, "soft")
    refuse_router_options(model, "soft")

  def __init__(self, model: ml_collections.ConfigDict, *, rngs: nnx.Rngs,
               mesh: Mesh | None = None):
    del mesh   # plain arrays under GSPMD: every row's slots stay on the row's device
    moe, dims = model.moe, moe_dims(model)
    d, pd = model.d_model, jnp.dtype(model.param_dtype)
    slots = moe.get("soft_slots_per_expert", 1)
    self.phi = logical_param(rngs, (d, dims.experts, slots), d ** -0.5,
                             ("embed", "expert", None), pd)
    self.experts = expert_bank(model, rngs)
    self.shared = shared_experts(model, rngs)

  def forward(self, x, segment_ids=None, *, train=False, rng=None, token_ids=None, carry=None):
    """x: [B, S, D], segment_ids: [B, S] (0: padding) -> (y [B, S, D], aux loss 0, metrics,
    `carry` unchanged: the layer keeps no routing state)."""
    del train, rng, token_ids
    b, s, _ = x.shape
    mask = jnp.ones((b, s), bool) if segment_ids is None else segment_ids > 0
    y, combine = soft_moe(x, mask, self.phi[...], self.experts.weights(), self.experts.ffn)
    if self.shared is not None:
      y = y + self.shared(x).astype(y.dtype)
    m = mask.astype(jnp.float32)
    tokens = jnp.maximum(jnp.sum(m), 1.0)
    _, e, p = self.phi.shape
    metrics = {**usage_metrics(jnp.einsum("bsep,bs->e", combine, m)),
               "router_entropy": jnp.sum(entropy(combine.reshape(b, s, e * p)) * m) / tokens,
               "experts_per_token": jnp.float32(b * e * p) / tokens,
               "dropped_frac": jnp.zeros((), jnp.float32)}
    return y.astype(x.dtype), jnp.zeros((), jnp.float32), metrics, carry or {}
