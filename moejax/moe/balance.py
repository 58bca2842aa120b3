"""Auxiliary load-balancing losses and the routing metrics, over the routed (non-padding) tokens.

- The Switch Transformer load-balancing loss (Fedus et al. 2021, "Switch Transformers: Scaling to
  Trillion Parameter Models with Simple and Efficient Sparsity", arXiv:2101.03961, eq. 4).
- The ST-MoE router z-loss (Zoph et al. 2022, "ST-MoE: Designing Stable and Transferable Sparse
  Expert Models", arXiv:2202.08906, eq. 5).
- MaxVio ("Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts", Wang et al.
  2024, arXiv:2408.15664), whose bias balancing would live here too.

Padding tokens (segment id 0) are not routed: `token_mask` [T] is False for them, and they count
in no loss and no metric. Expert index E (the "no expert" sentinel of `Routing`) counts nowhere.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _mask(token_mask: jax.Array | None, t: int) -> jax.Array:
  return jnp.ones((t,), jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)


def load_balancing_loss(router_probs: jax.Array, expert_index: jax.Array,
                        token_mask: jax.Array | None = None, num_groups: int = 1) -> jax.Array:
  """Switch/GShard load-balancing loss E * sum_e f_e * P_e (arXiv:2101.03961, eq. 4).

  f_e is the fraction of the routed token copies sent to expert e and P_e the mean router
  probability of e, both over the routed tokens. It equals 1.0 for perfectly uniform routing.
  With `num_groups` = n > 1 the tokens are split into n equal consecutive groups (one per
  device: the statistics a device sees alone) and the loss is the mean of the n groups' losses.

  Args:
    router_probs: [T, E] probabilities summing to 1 over E.
    expert_index: [T, K] chosen experts; E (no expert) counts nowhere.
    token_mask: [T] bool, False for padding; None: every token is routed.
    num_groups: n, a divisor of T.
  """
  t, num_experts = router_probs.shape
  m = _mask(token_mask, t).reshape(num_groups, -1)                            # [n, T/n]
  onehot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32)       # [T, K, E]
  onehot = onehot.reshape(num_groups, -1, *onehot.shape[1:])                  # [n, T/n, K, E]
  probs = router_probs.astype(jnp.float32).reshape(num_groups, -1, num_experts)
  count = jnp.maximum(jnp.sum(m, axis=1), 1.0)                                # [n]
  k = expert_index.shape[1]
  f = jnp.sum(onehot * m[:, :, None, None], axis=(1, 2)) / (count * k)[:, None]   # [n, E]
  p = jnp.sum(probs * m[:, :, None], axis=1) / count[:, None]                     # [n, E]
  return jnp.mean(num_experts * jnp.sum(f * p, axis=-1))


def router_z_loss(logits: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
  """ST-MoE router z-loss: mean over routed tokens of logsumexp(logits)^2 (arXiv:2202.08906,
  eq. 5).

  Args:
    logits: [T, E] router logits.
    token_mask: [T] bool, False for padding.
  """
  m = _mask(token_mask, logits.shape[0])
  z = jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1))
  return jnp.sum(z * m) / jnp.maximum(jnp.sum(m), 1.0)


def entropy(p: jax.Array, axis: int = -1) -> jax.Array:
  """Entropy in nats of distributions `p` along `axis` (0 log 0 = 0)."""
  p = p.astype(jnp.float32)
  return -jnp.sum(p * jnp.log(jnp.where(p > 0, p, 1.0)), axis=axis)


def usage_metrics(usage: jax.Array) -> dict:
  """usage: [E] >= 0, how much each expert was used -> {`load` [E] (shares, summing to 1),
  `max_vio`}; no usage at all gives zero loads and no violation."""
  usage = usage.astype(jnp.float32)
  total = jnp.sum(usage)
  load = usage / jnp.where(total > 0, total, 1.0)
  max_vio = jnp.where(total > 0, jnp.max(load) / jnp.maximum(jnp.mean(load), 1e-30) - 1.0, 0.0)
  return {"load": load, "max_vio": max_vio}


def routing_metrics(router_probs: jax.Array, group_sizes: jax.Array,
                    token_mask: jax.Array | None = None) -> dict:
  """Per-layer routing metrics over the routed tokens.

  `load` [E] is each expert's share of the routed token copies; `max_vio` is max load / mean
  load - 1 (MaxVio, arXiv:2408.15664); `router_entropy` is the mean entropy (nats) of the
  per-token router distribution.

  Args:
    router_probs: [T, E]; group_sizes: [E] routed copies per expert; token_mask: [T] bool.
  """
  m = _mask(token_mask, router_probs.shape[0])
  return {**usage_metrics(group_sizes),
          "router_entropy": jnp.sum(entropy(router_probs) * m) / jnp.maximum(jnp.sum(m), 1.0)}
