"""Decoder-only Transformer LM with MoE FFNs every `moe_every` layers.

Pre-norm blocks ("On Layer Normalization in the Transformer Architecture", Xiong et al. 2020,
arXiv:2002.04745) with RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467), rotary position
embeddings (RoFormer, Su et al. 2021, arXiv:2104.09864), grouped-query attention (Ainslie et al.
2023, arXiv:2305.13245) and sparse MoE FFNs (moejax.moe).
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from moejax.moe import MLP, MoELayer, is_moe_layer
from moejax.params import logical_param, ones_param


@flax.struct.dataclass
class MoEAux:
  """What the MoE layers report besides the logits.

  Attributes:
    aux_loss: scalar, the weighted sum of every layer's router losses (add to the LM loss).
    layers: {layer_name: {metric_name: array}}, e.g. layers["layer_1"]["load"] is [E].
  """
  aux_loss: jax.Array
  layers: dict


class RMSNorm(nnx.Module):
  """RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467), statistics in float32."""

  def __init__(self, dim: int, *, param_dtype=jnp.float32, eps: float = 1e-6):
    self.scale = ones_param((dim,), ("embed",), param_dtype)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., D] -> [..., D] in x.dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (RoFormer, arXiv:2104.09864), half-split pairing.

  Args:
    x: [B, S, H, Dh].
    positions: [B, S] int.
  """
  half = x.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)            # [Dh/2]
  angle = positions[..., None].astype(jnp.float32) * freq                   # [B, S, Dh/2]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
  """Causal multi-head attention with RoPE and grouped-query heads (arXiv:2305.13245), computed
  by `jax.nn.dot_product_attention`. Packed sequences attend only within their segment."""

  def __init__(self, m: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    pd = jnp.dtype(m.param_dtype)
    self.dtype, self.theta = jnp.dtype(m.dtype), m.rope_theta
    d, h, kv, dh = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim
    qkv_std, out_std = d ** -0.5, (h * dh) ** -0.5
    self.wq = logical_param(rngs, (d, h, dh), qkv_std, ("embed", "heads", "head_dim"), pd)
    self.wk = logical_param(rngs, (d, kv, dh), qkv_std, ("embed", "kv_heads", "head_dim"), pd)
    self.wv = logical_param(rngs, (d, kv, dh), qkv_std, ("embed", "kv_heads", "head_dim"), pd)
    self.wo = logical_param(rngs, (h, dh, d), out_std, ("heads", "head_dim", "embed"), pd)

  def __call__(self, x, positions, segment_ids):
    """x: [B, S, D], positions: [B, S], segment_ids: [B, S] -> [B, S, D]."""
    x = x.astype(self.dtype)
    q = rope(jnp.einsum("bsd,dhk->bshk", x, self.wq[...].astype(self.dtype)), positions, self.theta)
    k = rope(jnp.einsum("bsd,dhk->bshk", x, self.wk[...].astype(self.dtype)), positions, self.theta)
    v = jnp.einsum("bsd,dhk->bshk", x, self.wv[...].astype(self.dtype))
    # Same-segment mask; with is_causal this is block-diagonal causal attention. Each token sees
    # at least itself, so no softmax row is empty.
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]   # [B, 1, S, S]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)
    return jnp.einsum("bshk,hkd->bsd", out, self.wo[...].astype(self.dtype))


class Block(nnx.Module):
  """Pre-norm Transformer block: x + attn(norm(x)), then x + ffn(norm(x)), ffn dense or MoE."""

  def __init__(self, m: ml_collections.ConfigDict, moe: bool, *, rngs: nnx.Rngs,
               mesh: Mesh | None = None):
    pd = jnp.dtype(m.param_dtype)
    self.attn_norm = RMSNorm(m.d_model, param_dtype=pd)
    self.attn = Attention(m, rngs=rngs)
    self.ffn_norm = RMSNorm(m.d_model, param_dtype=pd)
    self.is_moe = moe
    self.ffn = (MoELayer(m, rngs=rngs, mesh=mesh) if moe else
                MLP(m.d_model, m.d_ff, m.moe.expert_type, rngs=rngs, dtype=jnp.dtype(m.dtype),
                    param_dtype=pd))

  def __call__(self, x, positions, segment_ids, *, train, rng):
    """x: [B, S, D] -> (x [B, S, D], aux_loss, metrics or None)."""
    x = x + self.attn(self.attn_norm(x), positions, segment_ids).astype(x.dtype)
    h = self.ffn_norm(x)
    if self.is_moe:
      y, aux_loss, metrics = self.ffn(h, segment_ids, train=train, rng=rng)
    else:
      y, aux_loss, metrics = self.ffn(h), jnp.zeros((), jnp.float32), None
    return x + y.astype(x.dtype), aux_loss, metrics


class Transformer(nnx.Module):
  """Decoder-only LM ("Language Models are Unsupervised Multitask Learners", Radford et al.
  2019) with sparse MoE FFNs (Shazeer et al. 2017, arXiv:1701.06538)."""

  def __init__(self, m: ml_collections.ConfigDict, *, rngs: nnx.Rngs, mesh: Mesh | None = None):
    """`mesh`: where the model runs (None: one device); the MoE layers shard_map over it."""
    pd = jnp.dtype(m.param_dtype)
    self.dtype, self.tie = jnp.dtype(m.dtype), m.tie_embeddings
    self.embed = logical_param(rngs, (m.vocab_size, m.d_model), 1.0, ("vocab", "embed"), pd)
    self.blocks = nnx.List([Block(m, is_moe_layer(m, i), rngs=rngs, mesh=mesh)
                            for i in range(m.num_layers)])
    self.final_norm = RMSNorm(m.d_model, param_dtype=pd)
    self.head = (None if m.tie_embeddings else
                 logical_param(rngs, (m.d_model, m.vocab_size), m.d_model ** -0.5,
                               ("embed", "vocab"), pd))
    self.d_model = m.d_model

  def __call__(self, inputs: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, *, train: bool = False,
               rng: jax.Array | None = None) -> tuple[jax.Array, MoEAux]:
    """inputs: [B, S] int token ids -> (logits [B, S, V] float32, MoEAux).

    positions [B, S] default to 0..S-1; segment_ids [B, S] (packed documents) default to one
    segment per row. `rng` feeds router noise (e.g. Switch jitter) when training.
    """
    b, s = inputs.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    if segment_ids is None:
      segment_ids = jnp.ones((b, s), jnp.int32)
    x = self.embed[...].astype(self.dtype)[inputs]
    aux_loss, layers = jnp.zeros((), jnp.float32), {}
    for i, block in enumerate(self.blocks):
      layer_rng = None if rng is None else jax.random.fold_in(rng, i)
      x, layer_loss, metrics = block(x, positions, segment_ids, train=train, rng=layer_rng)
      aux_loss = aux_loss + layer_loss
      if metrics is not None:
        layers[f"layer_{i}"] = metrics
    x = self.final_norm(x)
    if self.tie:
      # Tied head: scale so initial logits are O(1) with unit-variance embeddings.
      embed = self.embed[...].astype(self.dtype)
      logits = jnp.einsum("bsd,vd->bsv", x, embed) * self.d_model ** -0.5
    else:
      logits = jnp.einsum("bsd,dv->bsv", x, self.head[...].astype(self.dtype))
    return logits.astype(jnp.float32), MoEAux(aux_loss=aux_loss, layers=layers)
