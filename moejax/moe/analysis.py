"""Routing analysis: what each MoE layer decided on a batch, and how much it tells of the domain.

- `routing_trace(model, batch)`: every MoE layer's `Routing` on a batch, from one ordinary
  forward pass of the model (no change to the model is needed: `MoELayer.route` is wrapped
  while the pass is traced, so the trace follows whatever the model's own loop does).
- `expert_domain_mutual_information(expert_index, domain, E, M)`: I(expert; domain) in nats over
  the routed token copies, the specialisation measure of the router comparison of issue 11
  (experiments/routers). "Demons in the Detail: On Implementing Load Balancing Loss for Training
  Specialized Mixture-of-Expert Models" (Qiu et al. 2025, arXiv:2501.11873) argue that
  balancing over the global batch rather than each micro-batch lets experts specialise by
  domain; this is the number that tests it on the synthetic data, whose batches carry each
  sequence's latent `domain` (never shown to the model).
"""
from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.moe.layer import MoELayer
from moejax.moe.routing import Routing


@contextlib.contextmanager
def _recording_routes(model, records: dict, logits: dict):
  """While open, the first `MoELayer.route` call of each of `model`'s MoE layers (the layer's
  own router; Chain-of-Experts iterations route again) stores its `Routing` in `records` and its
  router logits [T, E] in `logits` (`Routing.carry["router_logits"]`: with the routing state of
  earlier layers, e.g. rmoe's recurrence or MoE++'s gating residual, and with the training noise
  when traced in training mode), under the layer's metric name (`layer_<i>`, as in
  `MoEAux.layers`)."""
  # A block's MoE layer, or the sparse layer a variant routes its sub-tokens through (MH-MoE's
  # `inner`).
  layers = {i: next((f for f in (block.ffn, getattr(block.ffn, "inner", None))
                     if isinstance(f, MoELayer)), None) for i, block in enumerate(model.blocks)}
  names = {id(layer): f"layer_{i}" for i, layer in layers.items() if layer is not None}
  original = MoELayer.route

  def route(self, x, *args, **kwargs):
    routing = original(self, x, *args, **kwargs)
    name = names.get(id(self))
    if name is not None and name not in records:
      records[name] = routing
      logits[name] = (routing.carry["router_logits"] if "router_logits" in routing.carry
                      else self.router.logits(x, train=False, rng=None))
    return routing

  MoELayer.route = route
  try:
    yield records
  finally:
    MoELayer.route = original


@functools.partial(jax.jit, static_argnames=("graphdef", "train"))
def _trace(graphdef, state, inputs, positions, segment_ids, rng, *, train):
  model = nnx.merge(graphdef, state)
  records, logits = {}, {}
  with _recording_routes(model, records, logits):
    model(inputs, positions, segment_ids, train=train, rng=rng)
  return records, logits


def routing_trace(model, batch: dict, *, train: bool = False,
                  rng: jax.Array | None = None) -> dict[str, Routing]:
  """Each MoE layer's routing decision when `model` (a `moejax.model.Transformer`) runs on
  `batch`.

  The layers' decisions are those of the router (`Routing`, before any capacity drop of the
  dispatch). Routers that look at the whole batch (expert choice) decide on this batch as given.

  Args:
    model: the Transformer (e.g. `nnx.merge(trainer.graphdef, params)`).
    batch: `inputs` [B, S] int, optional `positions` [B, S] and `segment_ids` [B, S] (other
      keys, such as `domain`, are ignored).
    train: route as in training (router noise needs `rng`).
  Returns:
    {"layer_<i>": Routing} for the MoE layers, with T = B*S tokens in row order.
  """
  return _trace_batch(model, batch, train, rng)[0]


def router_logits_trace(model, batch: dict) -> dict[str, jax.Array]:
  """{"layer_<i>": router logits [B*S, E] float32} of each MoE layer when `model` runs on
  `batch` in evaluation mode: the gate applied to the layer's input, what transformers'
  `output_router_logits=True` returns (the parity tests of `moejax.interop.hf`)."""
  return _trace_batch(model, batch, False, None)[1]


def _trace_batch(model, batch, train, rng):
  graphdef, state = nnx.split(model)
  inputs = jnp.asarray(batch["inputs"])
  b, s = inputs.shape
  positions = batch.get("positions")
  positions = (jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)) if positions is None
               else jnp.asarray(positions))
  segment_ids = batch.get("segment_ids")
  segment_ids = jnp.ones((b, s), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids)
  return _trace(graphdef, state, inputs, positions, segment_ids, rng, train=train)


def expert_domain_counts(expert_index, domain, num_experts: int, num_domains: int) -> np.ndarray:
  """[E, M] counts of routed token copies per (expert, domain); the sentinel E is left out.

  Args:
    expert_index: [T, K] int, in [0, E]; E = no expert.
    domain: [T] int in [0, M), the domain of each token (`np.repeat(batch["domain"], S)`).
  """
  index = np.asarray(expert_index)
  if index.ndim == 1:
    index = index[:, None]
  dom = np.broadcast_to(np.asarray(domain)[:, None], index.shape)
  routed = (index >= 0) & (index < num_experts)
  joint = np.zeros((num_experts, num_domains), np.float64)
  np.add.at(joint, (index[routed], dom[routed]), 1.0)
  return joint


def expert_domain_mutual_information(expert_index, domain, num_experts: int,
                                     num_domains: int) -> float:
  """I(expert; domain) in nats over the routed token copies.

  Every slot (t, k) with expert_index[t, k] = e < E is one draw of the pair (e, domain[t]); the
  sentinel E ("no expert": padding, drops, unused slots) is not a draw. With p(e, d) the
  fraction of draws, I = sum_{e,d} p(e, d) log(p(e, d) / (p(e) p(d))) (Cover & Thomas, Elements
  of Information Theory, 2nd ed., eq. 2.28). It is 0 when the experts chosen do not depend on
  the domain and at most log(min(E, M)), reached when the domain (uniform) and the expert
  determine each other.

  Args:
    expert_index: [T, K] int, in [0, E]; E = no expert.
    domain: [T] int in [0, M), the domain of each token (`np.repeat(batch["domain"], S)`).
    num_experts: E; num_domains: M.
  Returns:
    The mutual information in nats (0.0 when no copy was routed).
  """
  return mutual_information_of_counts(
      expert_domain_counts(expert_index, domain, num_experts, num_domains))


def mutual_information_of_counts(joint: np.ndarray) -> float:
  """I(row; column) in nats of a table of counts [E, M] (0.0 for an empty table)."""
  joint = np.asarray(joint, np.float64)
  total = joint.sum()
  if total == 0:
    return 0.0
  p = joint / total
  outer = p.sum(axis=1, keepdims=True) * p.sum(axis=0, keepdims=True)
  nz = p > 0
  return float(np.sum(p[nz] * np.log(p[nz] / outer[nz])))


def token_domains(batch: dict) -> np.ndarray:
  """[T] domain of each token of `batch` (its `domain` [B] repeated over the S positions)."""
  b, s = np.asarray(batch["inputs"]).shape
  return np.repeat(np.asarray(batch["domain"]), s)


def layer_domain_counts(model, batches: list[dict], num_domains: int) -> dict[str, np.ndarray]:
  """{"layer_<i>": [E, M] counts of (expert, domain) copies} of `model`'s evaluation routing over
  all `batches` pooled (each a host batch with `domain` [B]), layers in order."""
  counts: dict[str, np.ndarray] = {}
  for batch in batches:
    domain = np.asarray(batch["domain"])                                   # [B]
    for name, routing in routing_trace(model, batch).items():
      # A layer sees B rows of T_l / B tokens each: S, the k tokens a Mixture-of-Depths block
      # chose of each row (moejax.moe.depth, gathered row by row), or S h sub-tokens (MH-MoE);
      # a row is one domain.
      dom = np.repeat(domain, routing.expert_index.shape[0] // len(domain))
      c = expert_domain_counts(routing.expert_index, dom, routing.num_experts, num_domains)
      counts[name] = counts.get(name, 0) + c
  return dict(sorted(counts.items(), key=lambda kv: int(kv[0].split("_")[1])))


def layer_mutual_information(model, batches: list[dict], num_domains: int) -> dict[str, float]:
  """{"layer_<i>": I(expert; domain)} of `model` (evaluation routing) over the token copies of
  all `batches` pooled (each a host batch with `domain` [B])."""
  return {name: mutual_information_of_counts(c)
          for name, c in layer_domain_counts(model, batches, num_domains).items()}
