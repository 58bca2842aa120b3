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

from moejax.moe import MLP, depth, is_moe_layer
from moejax.moe.variants import MOE_LAYERS
from moejax.params import logical_param, ones_param, side_rngs, zeros_param

_MOD_SALT = 0xD0D   # the Mixture-of-Depths routers' side stream


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

  def __init__(self, dim: int, *, param_dtype=jnp.float32, eps: float = 1e-6,
               names: tuple[str, ...] = ("embed",)):
    """`names`: the logical axis of the scale [dim] (moejax.sharding)."""
    self.scale = ones_param((dim,), names, param_dtype)
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


QK_NORMS = ("", "head", "full")


class Attention(nnx.Module):
  """Causal multi-head attention with RoPE and grouped-query heads (arXiv:2305.13245), computed
  by `jax.nn.dot_product_attention`. Packed sequences attend only within their segment.

  Options for released checkpoints (moejax.interop.hf): `model.qkv_bias` adds biases to the q,
  k, v projections (Qwen2, arXiv:2407.10671); `model.qk_norm` RMS-normalises q and k before RoPE
  ("Scaling Vision Transformers to 22 Billion Parameters", Dehghani et al. 2023,
  arXiv:2302.05442): per head ("head", Qwen3) or over all heads of the projection at once
  ("full", OLMoE, arXiv:2409.02060).
  """

  def __init__(self, m: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    pd = jnp.dtype(m.param_dtype)
    self.dtype, self.theta = jnp.dtype(m.dtype), m.rope_theta
    d, h, kv, dh = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim
    qkv_std, out_std = d ** -0.5, (h * dh) ** -0.5
    self.wq = logical_param(rngs, (d, h, dh), qkv_std, ("embed", "heads", "head_dim"), pd)
    self.wk = logical_param(rngs, (d, kv, dh), qkv_std, ("embed", "kv_heads", "head_dim"), pd)
    self.wv = logical_param(rngs, (d, kv, dh), qkv_std, ("embed", "kv_heads", "head_dim"), pd)
    self.wo = logical_param(rngs, (h, dh, d), out_std, ("heads", "head_dim", "embed"), pd)
    # Biases and "full" norm scales are flat over heads x head_dim: 1-D weights take no weight
    # decay (moejax.train.make_optimizer), and "heads" shards the flat axis by whole heads.
    if m.get("qkv_bias", False):
      self.bq = zeros_param((h * dh,), ("heads",), pd)
      self.bk = zeros_param((kv * dh,), ("kv_heads",), pd)
      self.bv = zeros_param((kv * dh,), ("kv_heads",), pd)
    else:
      self.bq = self.bk = self.bv = None
    self.qk_norm = m.get("qk_norm", "")
    eps = m.get("norm_eps", 1e-6)
    if self.qk_norm:
      per_head = self.qk_norm == "head"
      self.q_norm = RMSNorm(dh if per_head else h * dh, param_dtype=pd, eps=eps,
                            names=("head_dim",) if per_head else ("heads",))
      self.k_norm = RMSNorm(dh if per_head else kv * dh, param_dtype=pd, eps=eps,
                            names=("head_dim",) if per_head else ("kv_heads",))
    else:
      self.q_norm = self.k_norm = None

  def _project(self, x, w, bias, norm):
    """x: [B, S, D], w: [D, H, Dh] -> [B, S, H, Dh], plus bias, then the qk-norm (if any)."""
    y = jnp.einsum("bsd,dhk->bshk", x, w[...].astype(self.dtype))
    if bias is not None:
      y = y + bias[...].astype(self.dtype).reshape(y.shape[2:])
    if norm is not None and self.qk_norm == "full":
      y = norm(y.reshape(*y.shape[:2], -1)).reshape(y.shape)
    elif norm is not None:
      y = norm(y)
    return y

  def __call__(self, x, positions, segment_ids):
    """x: [B, S, D], positions: [B, S], segment_ids: [B, S] -> [B, S, D]."""
    x = x.astype(self.dtype)
    q = rope(self._project(x, self.wq, self.bq, self.q_norm), positions, self.theta)
    k = rope(self._project(x, self.wk, self.bk, self.k_norm), positions, self.theta)
    v = self._project(x, self.wv, self.bv, None)
    # Same-segment mask; with is_causal this is block-diagonal causal attention. Each token sees
    # at least itself, so no softmax row is empty.
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]   # [B, 1, S, S]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)
    return jnp.einsum("bshk,hkd->bsd", out, self.wo[...].astype(self.dtype))


class LatentAttention(nnx.Module):
  """Multi-head latent attention (MLA; "DeepSeek-V2: A Strong, Economical, and Efficient
  Mixture-of-Experts Language Model", arXiv:2405.04434, sec. 2.1; as used by DeepSeek-V3,
  arXiv:2412.19437): keys and values come up from one RMS-normalised latent c [B, S, L_kv]; each
  q/k head is a no-position part (Dh - R) and a RoPE part (R) whose key is one head shared by all
  heads; queries optionally pass through a latent of rank L_q too.

  Config `model.attention = "mla"` and `model.mla.*`; Dh = `model.head_dim` (RoPE part
  included). Weights: wq_a [D, L_q], q_norm, wq_b [L_q, H, Dh] (or wq [D, H, Dh] when
  q_lora_rank = 0); wkv_a [D, L_kv + R] (the latent and the shared RoPE key, W^DKV and W^KR);
  kv_norm; wkv_b [L_kv, H, Dh - R + Dv] (W^UK and W^UV); wo [H, Dv, D]. RoPE pairs halves, as
  everywhere in moejax (checkpoints with interleaved pairs are permuted on import).
  """

  def __init__(self, m: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    pd = jnp.dtype(m.param_dtype)
    la = m.mla
    self.dtype, self.theta = jnp.dtype(m.dtype), m.rope_theta
    d, h, dh = m.d_model, m.num_heads, m.head_dim
    r, dv, lq, lkv = la.rope_head_dim, la.v_head_dim, la.q_lora_rank, la.kv_lora_rank
    self.nope, self.kv_lora = dh - r, lkv
    # DeepSeek's latent norms use eps 1e-6 whatever the model's (its reference implementation).
    if lq:
      self.wq_a = logical_param(rngs, (d, lq), d ** -0.5, ("embed", "q_lora"), pd)
      self.q_norm = RMSNorm(lq, param_dtype=pd, eps=1e-6, names=("q_lora",))
      self.wq_b = logical_param(rngs, (lq, h, dh), lq ** -0.5, ("q_lora", "heads", "head_dim"),
                                pd)
    else:
      self.wq = logical_param(rngs, (d, h, dh), d ** -0.5, ("embed", "heads", "head_dim"), pd)
    self.wkv_a = logical_param(rngs, (d, lkv + r), d ** -0.5, ("embed", "kv_lora"), pd)
    self.kv_norm = RMSNorm(lkv, param_dtype=pd, eps=1e-6, names=("kv_lora",))
    self.wkv_b = logical_param(rngs, (lkv, h, self.nope + dv), lkv ** -0.5,
                               ("kv_lora", "heads", "head_dim"), pd)
    self.wo = logical_param(rngs, (h, dv, d), (h * dv) ** -0.5, ("heads", "head_dim", "embed"),
                            pd)

  def __call__(self, x, positions, segment_ids):
    """x: [B, S, D], positions: [B, S], segment_ids: [B, S] -> [B, S, D]."""
    x = x.astype(self.dtype)
    w = lambda p: p[...].astype(self.dtype)
    if hasattr(self, "wq_a"):
      q = jnp.einsum("bsl,lhk->bshk", self.q_norm(x @ w(self.wq_a)), w(self.wq_b))
    else:
      q = jnp.einsum("bsd,dhk->bshk", x, w(self.wq))                        # [B, S, H, Dh]
    q = jnp.concatenate([q[..., :self.nope], rope(q[..., self.nope:], positions, self.theta)], -1)
    ckv = x @ w(self.wkv_a)                                                   # [B, S, L_kv + R]
    kv = jnp.einsum("bsl,lhk->bshk", self.kv_norm(ckv[..., :self.kv_lora]), w(self.wkv_b))
    k_nope, v = kv[..., :self.nope], kv[..., self.nope:]                      # v: [B, S, H, Dv]
    k_rope = rope(ckv[:, :, None, self.kv_lora:], positions, self.theta)      # [B, S, 1, R]
    k = jnp.concatenate(
        [k_nope, jnp.broadcast_to(k_rope, (*k_nope.shape[:3], k_rope.shape[-1]))], -1)
    # dot_product_attention wants one head width: zero-pad the narrower of q/k and v; padding
    # adds nothing to q.k or to the output, and the scale stays 1/sqrt(Dh).
    dh, dv = q.shape[-1], v.shape[-1]
    pad = lambda a: jnp.pad(a, [(0, 0)] * 3 + [(0, max(dh, dv) - a.shape[-1])])
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]   # [B, 1, S, S]
    out = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), mask=mask, is_causal=True,
                                       scale=dh ** -0.5)[..., :dv]
    return jnp.einsum("bshk,hkd->bsd", out, w(self.wo))


ATTENTIONS = ("mha", "mla")


class Block(nnx.Module):
  """Pre-norm Transformer block: x + attn(norm(x)), then x + ffn(norm(x)), ffn dense or MoE.

  `mod=True` makes it a Mixture-of-Depths block ("Mixture-of-Depths: Dynamically allocating
  compute in transformer-based language models", Raposo et al. 2024, arXiv:2404.02258, eq. 1;
  `moejax.moe.depth`): a router w [D] scores the tokens, r = x w; the top k =
  round(`model.mod_capacity` * S) of each sequence run through the block alone (attention among
  them, in their order and positions), x_i + r_i (attn + ffn)_i; the others leave it unchanged.
  The top-k over a sequence is not causal (a later token can change an earlier choice): see
  `moejax.moe.depth` for the predictor loss that stands in for it when sampling.
  """

  def __init__(self, m: ml_collections.ConfigDict, moe: bool, *, rngs: nnx.Rngs,
               mesh: Mesh | None = None, mod: bool = False):
    pd = jnp.dtype(m.param_dtype)
    eps = m.get("norm_eps", 1e-6)
    self.attn_norm = RMSNorm(m.d_model, param_dtype=pd, eps=eps)
    self.attn = (LatentAttention if m.get("attention", "mha") == "mla" else Attention)(m, rngs=rngs)
    self.ffn_norm = RMSNorm(m.d_model, param_dtype=pd, eps=eps)
    self.is_moe = moe
    self.ffn = (MOE_LAYERS[m.moe.get("layer", "sparse")](m, rngs=rngs, mesh=mesh) if moe else
                MLP(m.d_model, m.get("dense_d_ff", 0) or m.d_ff, m.moe.expert_type, rngs=rngs,
                    dtype=jnp.dtype(m.dtype), param_dtype=pd))
    # Mixture-of-Depths router, from a side stream (moejax.params.side_rngs): every plain
    # weight of the model is drawn exactly as without it. A vector, so it takes no weight
    # decay (moejax.train.make_optimizer).
    self.mod_router = (logical_param(side_rngs(rngs, _MOD_SALT), (m.d_model,),
                                     m.d_model ** -0.5, ("embed",), pd) if mod else None)
    self.mod_capacity = depth.mod_capacity(m) if mod else 0.0
    self.mod_aux_loss_weight = float(m.get("mod_aux_loss_weight", 0.01))

  def __call__(self, x, positions, segment_ids, *, train, rng, token_ids=None, carry=None):
    """x: [B, S, D], token_ids: [B, S] (the model's input ids, for routers that read them),
    carry: the routing state of the previous MoE layer ({}: none yet) -> (x [B, S, D], aux_loss,
    metrics or None, the routing state for the next MoE layer)."""
    carry = {} if carry is None else carry
    if self.mod_router is not None:
      return self._routed(x, positions, segment_ids, train=train, rng=rng, token_ids=token_ids,
                          carry=carry)
    x = x + self.attn(self.attn_norm(x), positions, segment_ids).astype(x.dtype)
    y, aux_loss, metrics, carry = self._ffn(self.ffn_norm(x), segment_ids, train=train, rng=rng,
                                            token_ids=token_ids, carry=carry)
    return x + y.astype(x.dtype), aux_loss, metrics, carry

  def _ffn(self, h, segment_ids, *, train, rng, token_ids, carry):
    """The FFN on h [B, S, D] -> (y, aux loss, metrics (None for a dense FFN), carry)."""
    if self.is_moe:
      return self.ffn.forward(h, segment_ids, train=train, rng=rng, token_ids=token_ids,
                              carry=carry)
    return self.ffn(h), jnp.zeros((), jnp.float32), None, carry

  def _routed(self, x, positions, segment_ids, *, train, rng, token_ids, carry):
    """The Mixture-of-Depths block (arguments and results as `__call__`). The block's MoE layer
    (if any) sees the B*k chosen tokens, and the routing state of those rows (`depth.gather_carry`,
    `depth.scatter_carry`). Metrics add `mod_loss` (the unweighted sec. 3.5 predictor loss) and
    `mod_causal_agreement`; the aux loss adds `model.mod_aux_loss_weight` * `mod_loss`; the MoE
    layer's `experts_per_token` is over all the rows' tokens (the chosen ones' copies / every
    real token), the expert compute the block spent per token."""
    b, s, _ = x.shape
    k = depth.mod_tokens(self.mod_capacity, s)
    scores = depth.router_scores(x, self.mod_router[...])                        # [B, S]
    valid = segment_ids > 0
    index = depth.select_tokens(scores, valid, k)                                # [B, k]
    xs, ps, ss = (depth.gather_tokens(a, index) for a in (x, positions, segment_ids))
    ids = None if token_ids is None else depth.gather_tokens(token_ids, index)
    a = self.attn(self.attn_norm(xs), ps, ss).astype(x.dtype)
    h = self.ffn_norm(xs + a)
    rows = depth.flat_rows(index, s)
    y, aux_loss, metrics, sub_carry = self._ffn(h, ss, train=train, rng=rng, token_ids=ids,
                                                carry=depth.gather_carry(carry, rows))
    carry = depth.scatter_carry(carry, sub_carry, rows, b * s)
    metrics = metrics or {}
    # eq. 1: x_i + r_i f_i(X~); padding that had to be chosen (rows shorter than k) is left as is.
    r = depth.gather_tokens(scores, index) * (ss > 0)                            # [B, k]
    update = r[..., None] * (a + y.astype(x.dtype)).astype(jnp.float32)
    out = depth.scatter_tokens(x, index, xs + update.astype(x.dtype))
    mod_loss, agreement = depth.causal_predictor_loss(scores, depth.chosen_mask(index, s), valid)
    aux_loss = aux_loss + self.mod_aux_loss_weight * mod_loss
    metrics = {**metrics, "mod_loss": mod_loss, "mod_causal_agreement": agreement}
    if "experts_per_token" in metrics:
      # Expert FFNs per token of the sequences, not per chosen token: the FLOPs the block spent.
      chosen, real = jnp.sum(ss > 0), jnp.maximum(jnp.sum(valid), 1)
      metrics["experts_per_token"] = metrics["experts_per_token"] * chosen / real
    return out, aux_loss, metrics, carry


class Transformer(nnx.Module):
  """Decoder-only LM ("Language Models are Unsupervised Multitask Learners", Radford et al.
  2019) with sparse MoE FFNs (Shazeer et al. 2017, arXiv:1701.06538)."""

  def __init__(self, m: ml_collections.ConfigDict, *, rngs: nnx.Rngs, mesh: Mesh | None = None):
    """`mesh`: where the model runs (None: one device); the MoE layers shard_map over it."""
    pd = jnp.dtype(m.param_dtype)
    self.dtype, self.tie = jnp.dtype(m.dtype), m.tie_embeddings
    self.embed = logical_param(rngs, (m.vocab_size, m.d_model), 1.0, ("vocab", "embed"), pd)
    self.blocks = nnx.List([Block(m, is_moe_layer(m, i), rngs=rngs, mesh=mesh,
                                  mod=depth.is_mod_block(m, i))
                            for i in range(m.num_layers)])
    moe_layers = [block.ffn for block in self.blocks if block.is_moe]
    for index, layer in enumerate(moe_layers):
      layer.link(moe_layers, index)
    self.final_norm = RMSNorm(m.d_model, param_dtype=pd, eps=m.get("norm_eps", 1e-6))
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
    aux_loss, layers, carry = jnp.zeros((), jnp.float32), {}, {}
    for i, block in enumerate(self.blocks):
      layer_rng = None if rng is None else jax.random.fold_in(rng, i)
      x, layer_loss, metrics, carry = block(x, positions, segment_ids, train=train,
                                            rng=layer_rng, token_ids=inputs, carry=carry)
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
