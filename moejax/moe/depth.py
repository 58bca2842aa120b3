"""Mixture-of-Depths: a per-block router picks the tokens of each sequence that go through the
block; the others skip it on the residual stream.

"Mixture-of-Depths: Dynamically allocating compute in transformer-based language models",
Raposo et al. 2024, arXiv:2404.02258. In a routed block l, a router w [D] scores every token,
r_i = w^T x_i, and with P_beta(R) the beta-percentile of the sequence's scores (beta = 1 - k/S
for a capacity of k tokens), eq. 1 is

    x_i^{l+1} = r_i f_i(X~) + x_i    if r_i > P_beta(R)    (the top k tokens of the sequence)
    x_i^{l+1} = x_i                  otherwise,

where X~ are the chosen tokens and f the block's attention + FFN, run on X~ alone (attention
among the chosen tokens only). Multiplying f by r_i puts the router on the gradient path.
k = round(`model.mod_capacity` * S) is static, so every shape is known at compile time; the
paper routes every other block (`model.mod_every` = 2) with capacity 12.5%.

Causality (sec. 3.5): the top-k of a sequence depends on later tokens, so the choice cannot be
made when sampling one token at a time. The paper's first remedy is implemented here: a binary
cross-entropy loss whose logits are the router scores r_i and whose targets are the top-k
decisions (1 chosen, 0 not), weighted by `model.mod_aux_loss_weight`; it trains r_i > 0 to
predict the choice, a per-token (causal) rule. The metric `mod_causal_agreement` is how often
that rule agrees with the top-k. The second remedy (a separate MLP predictor on stop-gradient
inputs) and a sampling path that uses the causal rule are not implemented: moejax has no
autoregressive sampler; every forward pass here uses the top-k.

Pure functions; the router weight lives in `moejax.model.Block`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


def mod_capacity(model: ml_collections.ConfigDict) -> float:
  """`model.mod_capacity` c, the fraction of each sequence a routed block processes; 0 and 1
  (and a config without the field) mean no Mixture-of-Depths."""
  return float(model.get("mod_capacity", 0.0))


def is_mod_block(model: ml_collections.ConfigDict, layer: int) -> bool:
  """Whether 0-based block `layer` routes its tokens: Mixture-of-Depths is on (0 < c < 1) and
  (layer + 1) is a multiple of `model.mod_every` (2: blocks 1, 3, ...; the paper's "every other
  block", the first block always full)."""
  c = mod_capacity(model)
  return 0.0 < c < 1.0 and (layer + 1) % model.get("mod_every", 2) == 0


def mod_tokens(capacity: float, seq_len: int) -> int:
  """k = round(c * S) tokens per sequence, at least 1 and at most S."""
  return min(seq_len, max(1, int(round(capacity * seq_len))))


def router_scores(x: jax.Array, w: jax.Array) -> jax.Array:
  """r = x w (eq. 1's router weights), float32: x [B, S, D], w [D] -> [B, S]."""
  return jnp.einsum("bsd,d->bs", x.astype(jnp.float32), w.astype(jnp.float32))


def select_tokens(scores: jax.Array, valid: jax.Array, k: int) -> jax.Array:
  """The k highest-scoring tokens of each sequence, in their original order.

  Padding (valid False) ranks below every token, so it is chosen only when a row has fewer than
  k tokens. Ties go to the earlier position (`jax.lax.top_k`), so the choice is deterministic.
  The top-k runs over S, which is never sharded: each device ranks its own rows.

  Args:
    scores: [B, S] float32 router scores r.
    valid: [B, S] bool, False for padding (segment id 0).
  Returns:
    index [B, k] int32, ascending in each row.
  """
  ranked = jnp.where(valid, scores, -jnp.inf)
  _, index = jax.lax.top_k(ranked, k)
  return jnp.sort(index, axis=-1).astype(jnp.int32)


def gather_tokens(a: jax.Array, index: jax.Array) -> jax.Array:
  """a [B, S, ...], index [B, k] -> a's chosen rows [B, k, ...]."""
  index = index.reshape(index.shape + (1,) * (a.ndim - 2))
  return jnp.take_along_axis(a, index, axis=1)


def scatter_tokens(a: jax.Array, index: jax.Array, values: jax.Array) -> jax.Array:
  """a [B, S, ...] with the rows `index` [B, k] replaced by `values` [B, k, ...]; every other row
  is `a`'s, bit for bit."""
  rows = jnp.arange(a.shape[0])[:, None]
  return a.at[rows, index].set(values.astype(a.dtype))


def flat_rows(index: jax.Array, seq_len: int) -> jax.Array:
  """index [B, k] -> the chosen tokens' rows in the flattened [B*S, ...] layout, [B*k]."""
  return (jnp.arange(index.shape[0])[:, None] * seq_len + index).reshape(-1)


def gather_carry(carry: dict, rows: jax.Array) -> dict:
  """The routing state of the chosen tokens: {name: [B*S, ...]} -> {name: [B*k, ...]}."""
  return {name: v[rows] for name, v in carry.items()}


def scatter_carry(before: dict, after: dict, rows: jax.Array, num_tokens: int) -> dict:
  """The routing state handed on past a routed block: the chosen tokens' rows from `after`
  ({name: [B*k, ...]}, the block's MoE layer), every other token's from `before` ({name:
  [B*S, ...]}: they skipped the block), or zeros when `before` has no such entry (no MoE layer
  had seen them yet)."""
  out = {}
  for name, v in after.items():
    old = before.get(name)
    if old is None or old.shape[1:] != v.shape[1:]:
      old = jnp.zeros((num_tokens,) + v.shape[1:], v.dtype)
    out[name] = old.at[rows].set(v.astype(old.dtype))
  return out


def chosen_mask(index: jax.Array, seq_len: int) -> jax.Array:
  """index [B, k] -> [B, S] bool, True at the chosen tokens."""
  rows = jnp.arange(index.shape[0])[:, None]
  return jnp.zeros((index.shape[0], seq_len), bool).at[rows, index].set(True)


def causal_predictor_loss(scores: jax.Array, chosen: jax.Array,
                          valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The auxiliary loss of sec. 3.5: mean over the tokens of
  BCE(sigmoid(r_i), 1[i in top-k]) = -t_i log sigmoid(r_i) - (1 - t_i) log(1 - sigmoid(r_i)),
  and the agreement of the causal rule r_i > 0 with the top-k.

  Args:
    scores: [B, S] float32 router scores; chosen: [B, S] bool top-k decisions (the targets, no
      gradient); valid: [B, S] bool (padding counts in neither number).
  Returns:
    (loss, agreement), float32 scalars.
  """
  t = chosen.astype(jnp.float32)
  v = valid.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(v), 1.0)
  loss = jnp.sum(optax.sigmoid_binary_cross_entropy(scores, t) * v) / n
  agreement = jnp.sum(((scores > 0) == chosen).astype(jnp.float32) * v) / n
  return loss, agreement
