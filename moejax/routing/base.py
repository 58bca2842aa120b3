"""The routing result, the router base class, the registry, and the router losses/metrics.

Router math runs in float32 whatever the model dtype. The split into scores -> probabilities ->
routing decision follows Flaxformer's routing module; the losses are the Switch Transformer
load-balancing loss (Fedus et al. 2021, arXiv:2101.03961, eq. 4) and the ST-MoE router z-loss
(Zoph et al. 2022, arXiv:2202.08906, eq. 5).
"""
from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from moejax.params import logical_param

ROUTERS: dict[str, Callable[..., "Router"]] = {}


def register(name: str):
  """Class decorator adding a router factory to `ROUTERS` under `name`."""
  def wrap(cls):
    if name in ROUTERS:
      raise ValueError(f"router {name!r} is registered twice")
    ROUTERS[name] = cls
    return cls
  return wrap


@flax.struct.dataclass
class Routing:
  """One routing decision, the same for every router (GShard's dispatch/combine information,
  Lepikhin et al. 2020, arXiv:2006.16668, kept in index form as in MegaBlocks, arXiv:2211.15841).

  Attributes:
    expert_index: [T, K] int32 expert chosen by each token's k-th slot.
    combine_weights: [T, K] float32 weight of that expert's output in the token's output.
    group_sizes: [E] int32 token copies sent to each expert before any drop; sums to T*K.
    router_probs: [T, E] float32 router probabilities (normalised to sum to 1 per token).
    aux_losses: {name: scalar} unweighted auxiliary losses (`lb_loss`, `z_loss`).
    metrics: {name: array} `load` [E], `router_entropy`, `max_vio`.
  """
  expert_index: jax.Array
  combine_weights: jax.Array
  group_sizes: jax.Array
  router_probs: jax.Array
  aux_losses: dict
  metrics: dict


def load_balancing_loss(router_probs: jax.Array, expert_index: jax.Array) -> jax.Array:
  """Switch/GShard load-balancing loss E * sum_e f_e * P_e (arXiv:2101.03961, eq. 4).

  f_e is the fraction of the T*K token copies routed to expert e and P_e the mean router
  probability of e. It equals 1.0 for perfectly uniform routing.

  Args:
    router_probs: [T, E] probabilities summing to 1 over E.
    expert_index: [T, K] chosen experts.
  """
  num_experts = router_probs.shape[-1]
  f = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32).mean(axis=(0, 1))
  p = router_probs.astype(jnp.float32).mean(axis=0)
  return num_experts * jnp.sum(f * p)


def router_z_loss(logits: jax.Array) -> jax.Array:
  """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (arXiv:2202.08906, eq. 5).

  Args:
    logits: [T, E] float32 router logits.
  """
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


def routing_metrics(router_probs: jax.Array, group_sizes: jax.Array) -> dict:
  """Per-layer routing metrics.

  `load` [E] is each expert's share of the token copies; `max_vio` is max load / mean load - 1
  (the MaxVio of "Auxiliary-Loss-Free Load Balancing", Wang et al. 2024, arXiv:2408.15664);
  `router_entropy` is the mean entropy (nats) of the per-token router distribution.
  """
  load = group_sizes.astype(jnp.float32) / jnp.maximum(jnp.sum(group_sizes), 1)
  max_vio = jnp.max(load) / jnp.mean(load) - 1.0
  p = router_probs.astype(jnp.float32)
  entropy = -jnp.sum(p * jnp.log(jnp.where(p > 0, p, 1.0)), axis=-1).mean()
  return {"load": load, "max_vio": max_vio, "router_entropy": entropy}


def top_k_lowest_index(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Top-k over the last axis, ties broken towards the lower expert index.

  `jax.lax.top_k` already returns equal values in index order; this function is the one place
  that promise is relied on (and tested), so every router shares it.

  Args:
    scores: [T, E] float32.
  Returns:
    (values [T, K], indices [T, K] int32).
  """
  values, indices = jax.lax.top_k(scores, k)
  return values, indices.astype(jnp.int32)


class Router(nnx.Module):
  """Base router: a linear gate W [D, E] giving float32 logits, then `decide`.

  Subclasses implement `decide(logits [T, E], *, train, rng) -> (expert_index [T, K],
  combine_weights [T, K], router_probs [T, E])` as a pure function of the logits; this class
  adds group sizes, losses and metrics, so every router returns the same `Routing`.
  """

  def __init__(self, d_model: int, num_experts: int, top_k: int, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32):
    self.num_experts, self.top_k = num_experts, top_k
    self.gate = logical_param(rngs, (d_model, num_experts), d_model ** -0.5,
                              ("embed", "expert"), param_dtype)

  def logits(self, x: jax.Array, *, train: bool, rng: jax.Array | None) -> jax.Array:
    """x: [T, D] -> router logits [T, E] in float32."""
    del train, rng
    return jnp.dot(x.astype(jnp.float32), self.gate[...].astype(jnp.float32))

  def decide(self, logits, *, train, rng):
    raise NotImplementedError

  def __call__(self, x: jax.Array, *, train: bool = False,
               rng: jax.Array | None = None) -> Routing:
    """x: [T, D] -> Routing."""
    if rng is not None:
      rng_logits, rng_decide = jax.random.split(rng)
    else:
      rng_logits = rng_decide = None
    logits = self.logits(x, train=train, rng=rng_logits)
    expert_index, combine_weights, probs = self.decide(logits, train=train, rng=rng_decide)
    group_sizes = jnp.bincount(expert_index.reshape(-1), length=self.num_experts).astype(jnp.int32)
    return Routing(
        expert_index=expert_index,
        combine_weights=combine_weights.astype(jnp.float32),
        group_sizes=group_sizes,
        router_probs=probs,
        aux_losses={"lb_loss": load_balancing_loss(probs, expert_index),
                    "z_loss": router_z_loss(logits)},
        metrics=routing_metrics(probs, group_sizes),
    )
