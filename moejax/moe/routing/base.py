"""The routing result, the router base class and the router registry.

Router math runs in float32 whatever the model dtype. The split into scores -> probabilities ->
routing decision follows Flaxformer's routing module; the losses and metrics are in
`moejax.moe.balance`.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from moejax.errors import ConfigError
from moejax.moe import balance
from moejax.params import logical_param
from moejax.registry import Registry

ROUTERS = Registry("model.moe.router")


@flax.struct.dataclass
class Routing:
  """One routing decision, the same for every router (GShard's dispatch/combine information,
  Lepikhin et al. 2020, "GShard: Scaling Giant Models with Conditional Computation and Automatic
  Sharding", arXiv:2006.16668, kept in index form as in MegaBlocks, arXiv:2211.15841).

  A slot may name no expert: its index is E (the sentinel `num_experts`) and its weight 0. Such
  slots (padding tokens; later, drops, null experts, expert choice) reach no matmul and count in
  no load. The K slots of one token name distinct experts (or the sentinel).

  Attributes:
    expert_index: [T, K] int32 expert of each token's k-th slot, in [0, E]; E = no expert.
    combine_weights: [T, K] float32 weight of that expert's output in the token's output.
    group_sizes: [E] int32 token copies sent to each expert before any drop.
    router_probs: [T, E] float32 router probabilities (normalised to sum to 1 per token).
    token_mask: [T] bool, False for tokens that were not routed (padding).
    aux_losses: {name: scalar} the unweighted auxiliary losses `lb_loss`, `z_loss` (the layer
      weights them), and `router_loss` when the router has its own, already weighted (ReMoE's
      adaptive L1, top-p's entropy loss).
    metrics: {name: array} `load` [E], `router_entropy`, `max_vio`.
    carry: {name: array [T, ...]} routing state handed to the next MoE layer of the model
      (`Router.carry_logits`): the router logits by default; routers that recur over depth
      put their state here. {} when the router keeps none.
  """
  expert_index: jax.Array
  combine_weights: jax.Array
  group_sizes: jax.Array
  router_probs: jax.Array
  token_mask: jax.Array
  aux_losses: dict
  metrics: dict
  carry: dict = flax.struct.field(default_factory=dict)

  @property
  def num_experts(self) -> int:
    """E, which is also the "no expert" index."""
    return self.router_probs.shape[-1]


def top_k_lowest_index(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Top-k over the last axis, ties broken towards the lower expert index.

  K rounds of argmax (which returns the first, lowest-index maximum), each masking the expert
  it took. Unlike `jax.lax.top_k`, which GSPMD all-gathers over a sharded token axis (every
  device then ranks the whole global batch), argmax is a reduction over E alone, so each device
  routes only its own tokens. The scores must be finite (router logits and probabilities are).

  Args:
    scores: [T, E] float32.
  Returns:
    (values [T, K], indices [T, K] int32).
  """
  num_experts = scores.shape[-1]
  masked, values, indices = scores, [], []
  for _ in range(k):
    index = jnp.argmax(masked, axis=-1).astype(jnp.int32)                         # [T]
    values.append(jnp.take_along_axis(scores, index[:, None], axis=-1)[:, 0])
    indices.append(index)
    masked = jnp.where(jax.nn.one_hot(index, num_experts, dtype=bool), -jnp.inf, masked)
  return jnp.stack(values, axis=-1), jnp.stack(indices, axis=-1)


_PADDING_LOGIT = -30.0   # far below router logits, yet sigmoid(-30) > 0 so no 0/0


def gating_residual(logits: jax.Array, previous: jax.Array, residual_map: jax.Array) -> jax.Array:
  """MoE++'s gating residual ("MoE++: Accelerating Mixture-of-Experts Methods with
  Zero-Computation Experts", Jin et al. 2024, arXiv:2410.07348): layer j's router
  logits are its own plus the previous MoE layer's (residual included, so the sum recurs over
  depth) through a learned map, G^j(x^j) = x^j W^j + G^(j-1) W_g^j. At the first MoE layer there
  is no previous and no residual (the caller passes none).

  A previous layer with a different number of router outputs cannot be mapped: every MoE layer
  of a model shares `model.moe`, so this is an error, raised when the model is traced.

  Args:
    logits: [T, E] float32, x W of this layer; previous: [T, E'] the previous layer's logits;
    residual_map: W_g [E, E].
  Returns:
    [T, E] float32.
  """
  if previous.shape != logits.shape:
    raise ValueError(f"gating residual: the previous MoE layer's router logits {previous.shape} "
                     f"do not match this layer's {logits.shape} (model.moe.gating_residual needs "
                     "the same router outputs in every MoE layer)")
  return logits + jnp.dot(previous.astype(jnp.float32), residual_map.astype(jnp.float32))


class RouterState(nnx.Variable):
  """Router state that the optimizer never touches: the trainer zeroes its gradient and the
  router updates it after each step (`Router.update_state`), e.g. the selection bias of
  loss-free balancing or ReMoE's adaptive L1 coefficient. Checkpointed with the parameters."""


class Router(nnx.Module):
  """Base router: a linear gate W [D, E] giving float32 logits, then `decide`.

  Subclasses implement `decide(logits [T, E], *, train, rng, token_ids) -> (expert_index [T, K],
  combine_weights [T, K], router_probs [T, E])`; this class masks the padding, adds group sizes,
  losses and metrics, so every router returns the same `Routing`. K is the router's slot count
  (`num_slots`): the config's top-k for token-choice routers, more for routers that give a
  token a variable number of experts (unused slots hold the "no expert" index E).

  Class attributes a router sets to say what it is (`moejax.moe.routing.describe` lists them):
    causal: a token's routing depends on no later token.
    batch_independent: a token's routing depends on no other sequence of the batch.
    dispatch_modes: the `model.moe.dispatch` strategies it works with.
    per_slot_outputs: at training the layer dispatches each slot apart and adds the router's
      `slot_loss(y_slots [K, T, D], token_mask [T])` (THOR's consistency loss).
    has_gate: it has the linear gate W [D, E] (hash and random routing have none; their logits
      are zeros).
    selection_bias: accepts loss-free balancing (`bias_update_rate`): a per-expert bias added to
      the scores for the top-k selection only ("Auxiliary-Loss-Free Load Balancing Strategy for
      Mixture-of-Experts", Wang et al. 2024, arXiv:2408.15664).
  Constructor arguments every router takes (the layer supplies them):
    vocab_size: V of the model (routers that read token ids).
    bias_update_rate: u of loss-free balancing; 0 = off. After each step the bias moves by
      b_e += u * sign(mean load - load_e) over the global batch (`update_state`).
  """
  causal: bool = True
  batch_independent: bool = True
  selection_bias: bool = False
  dispatch_modes: tuple[str, ...] = ("capacity", "dropless")
  has_gate: bool = True
  per_slot_outputs: bool = False
  # MoE++'s gating residual W_g [E, E] (`enable_gating_residual`); None: off, no parameter.
  residual_map = None

  def __init__(self, d_model: int, num_experts: int, top_k: int, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32, vocab_size: int | None = None,
               bias_update_rate: float = 0.0):
    self.num_experts, self.top_k, self.vocab_size = num_experts, top_k, vocab_size
    if bias_update_rate and not self.selection_bias:
      raise ConfigError("model.moe.bias_update_rate", bias_update_rate,
                        f"0 for router {type(self).__name__}, which selects no top-k of "
                        "scores (loss-free balancing biases a top-k selection)")
    if not (isinstance(bias_update_rate, (int, float)) and bias_update_rate >= 0):
      raise ConfigError("model.moe.bias_update_rate", bias_update_rate, "a number >= 0")
    self.bias_update_rate = float(bias_update_rate)
    self.gate = (logical_param(rngs, (d_model, num_experts), d_model ** -0.5,
                               ("embed", "expert"), param_dtype) if self.has_gate else None)
    self.bias = (RouterState(jnp.zeros((num_experts,), jnp.float32))
                 if self.uses_bias() else None)

  def uses_bias(self) -> bool:
    """Whether this router keeps a selection bias (loss-free balancing is on)."""
    return self.bias_update_rate > 0

  @property
  def num_slots(self) -> int:
    """K of the `Routing` this router returns."""
    return self.top_k

  def logits(self, x: jax.Array, *, train: bool, rng: jax.Array | None) -> jax.Array:
    """x: [T, D] -> router logits [T, E] in float32."""
    del train, rng
    if self.gate is None:
      return jnp.zeros((x.shape[0], self.num_experts), jnp.float32)
    return jnp.dot(x.astype(jnp.float32), self.gate[...].astype(jnp.float32))

  def carry_logits(self, x: jax.Array, carry: dict, *, train: bool,
                   rng: jax.Array | None) -> tuple[jax.Array, dict]:
    """Router logits from the token and the routing state `carry` that the previous MoE layer
    handed on ({} at the first MoE layer): x [T, D], carry {name: [T, ...]} -> (logits [T, E]
    float32, the carry for the next MoE layer). By default the logits ignore the carry and are
    handed on as `router_logits`; routers that recur over depth override this. With the
    gating residual on (`enable_gating_residual`) the previous layer's `router_logits` are
    added through W_g (`gating_residual`), and the sum is handed on."""
    logits = self.logits(x, train=train, rng=rng)
    if self.residual_map is not None and "router_logits" in carry:
      logits = gating_residual(logits, carry["router_logits"], self.residual_map[...])
    return logits, {"router_logits": logits}

  def enable_gating_residual(self, *, rngs: nnx.Rngs, param_dtype=jnp.float32) -> None:
    """Adds MoE++'s gating residual W_g [E, E] (`gating_residual`), normal with the fan-in
    scale E^-1/2, replicated. Called by the layer after the router is built
    (`model.moe.gating_residual`), so the router's other parameters keep their values."""
    e = self.num_experts
    self.residual_map = logical_param(rngs, (e, e), e ** -0.5, (None, None), param_dtype)

  def link(self, routers: list, index: int) -> None:
    """Called once in a model (`MoELayer.link`) with the model's routers in depth order, this
    one at `index`: for routers that share parameters over depth (rmoe's GRU cell); nothing by
    default."""
    del routers, index

  def select(self, scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Top-k of `scores` [T, E] plus the selection bias (if any); returns (the unbiased scores
    of the chosen experts [T, k], their indices [T, k] int32): the bias changes which experts
    are chosen, never the gates (arXiv:2408.15664, eq. 3)."""
    if self.bias is None:
      return top_k_lowest_index(scores, k)
    _, index = top_k_lowest_index(scores + self.bias[...], k)
    return jnp.take_along_axis(scores, index, axis=-1), index

  def decide(self, logits, *, train, rng, token_ids):
    raise NotImplementedError

  def update_state(self, metrics: dict) -> None:
    """After an optimizer step: b_e += u * sign(mean load - load_e) (arXiv:2408.15664, Alg. 1),
    `metrics["load"]` [E] being the global batch's load of this layer. Subclasses with other
    state extend this."""
    if self.bias is not None and self.bias_update_rate > 0:
      load = metrics["load"].astype(jnp.float32)
      self.bias[...] = self.bias[...] + self.bias_update_rate * jnp.sign(jnp.mean(load) - load)

  def extra_losses(self, logits, probs, expert_index, combine_weights, token_mask) -> dict:
    """Router-specific losses, already weighted (added to the model loss as they are) and
    metrics; {} by default. Arrays as in `decide`, token_mask [T] bool."""
    del logits, probs, expert_index, combine_weights, token_mask
    return {}

  def __call__(self, x: jax.Array, token_mask: jax.Array | None = None, *, train: bool = False,
               rng: jax.Array | None = None, balance_groups: int = 1,
               token_ids: jax.Array | None = None, carry: dict | None = None) -> Routing:
    """x: [T, D], token_mask: [T] bool (False: padding, not routed), token_ids: [T] int (the
    model's input ids; routers that hash them need them), carry: the previous MoE layer's
    `Routing.carry` (None or {}: this is the first) -> Routing.

    `balance_groups` n > 1 computes the load-balancing loss per group of T/n consecutive
    tokens (per device, or per sequence: `model.moe.lb_loss_scope`) and averages it (see
    `balance.load_balancing_loss`).
    """
    if rng is not None:
      rng_logits, rng_decide = jax.random.split(rng)
    else:
      rng_logits = rng_decide = None
    logits, carry = self.carry_logits(x, carry or {}, train=train, rng=rng_logits)
    if token_mask is not None:
      # Padding scores far below any token, so routers that rank tokens against each other
      # (expert choice, BASE) take real tokens first; token-choice slots are masked below.
      logits = jnp.where(token_mask[:, None], logits, _PADDING_LOGIT)
    expert_index, combine_weights, probs = self.decide(logits, train=train, rng=rng_decide,
                                                       token_ids=token_ids)
    if token_mask is not None:
      expert_index = jnp.where(token_mask[:, None], expert_index, self.num_experts)
      combine_weights = jnp.where(token_mask[:, None], combine_weights, 0.0)
    else:
      token_mask = jnp.ones(x.shape[:1], bool)
    # The sentinel E falls outside `length` and is not counted.
    group_sizes = jnp.bincount(expert_index.reshape(-1), length=self.num_experts).astype(jnp.int32)
    extra = self.extra_losses(logits, probs, expert_index, combine_weights, token_mask)
    aux_losses = {"lb_loss": balance.load_balancing_loss(probs, expert_index, token_mask,
                                                         balance_groups),
                  "z_loss": balance.router_z_loss(logits, token_mask)}
    if "router_loss" in extra:
      aux_losses["router_loss"] = extra.pop("router_loss")
    return Routing(
        expert_index=expert_index.astype(jnp.int32),
        combine_weights=combine_weights.astype(jnp.float32),
        group_sizes=group_sizes,
        router_probs=probs,
        token_mask=token_mask,
        aux_losses=aux_losses,
        metrics={**balance.routing_metrics(probs, group_sizes, token_mask), **extra},
        carry=carry,
    )
