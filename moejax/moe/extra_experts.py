"""Zero-computation experts: router outputs past the E real experts, resolved elementwise
before dispatch, so they never reach the grouped matmul.

The router scores E' = E + N + X outputs: the E real experts of the bank, then N null experts
(`model.moe.null_experts`), then one output per entry of `model.moe.extra_experts`. After
routing, every slot that names a zero-computation expert (index j in [E, E')) adds its output,
scaled by its combine weight, elementwise, and becomes the "no expert" slot (index E, weight 0)
of the `Routing` contract, so dispatch, group sizes and the grouped matmul see the real-expert
copies only. A token may thus use anywhere from 0 to K real experts.

- Null experts ("AdaMoE: Token-Adaptive Routing with Null Experts for Mixture-of-Experts
  Language Models", Zeng et al. 2024, arXiv:2406.13233; N null experts, m in its notation,
  beside n = E true ones). A null expert outputs nothing, E_null(x) = 0, and the weights of a
  token's other slots are renormalised over them:
      g'_k = g_k / sum_{j: i_j not null} g_j       (0 when every slot is null),
  the form of the authors' released code (its Mixtral block renormalises over the true
  experts). Its load-balancing loss (`load_balancing_loss_func_with_null_experts`) is the
  Switch loss over all n + m outputs, null experts counted as experts: it keeps the average
  null share of the routed copies near m / (n + m) while each token takes as many null
  experts as the router decides; so is the layer's `lb_loss` here.
- MoE++'s zero, copy and constant experts ("MoE++: Accelerating Mixture-of-Experts Methods with
  Zero-Computation Experts", Jin et al. 2024, arXiv:2410.07348), without renormalisation,
  y = sum_k g_k E_{i_k}(x) with
      zero:     E(x) = 0                                    (discard)
      copy:     E(x) = x                                    (skip)
      constant: E(x) = a_1 x + a_2 v,  [a_1, a_2] = softmax(x W_c),  W_c [D, 2], v [D] (replace)
  Its heterogeneous load-balancing loss weights each zero-computation expert's term of the
  Switch loss by tau (`model.moe.zero_compute_lb_weight`, 1: the plain Switch loss over E'):
      L_b = E' sum_i eta_i f_i P_i,   eta_i = 1 (FFN expert) or tau (zero-computation expert)
  (written at the Switch loss's scale E' sum_i f_i P_i, which is 1 when balanced).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.moe import balance
from moejax.params import logical_param
from moejax.registry import Registry

ZERO_COMPUTE_EXPERTS = Registry("model.moe.extra_experts")


@ZERO_COMPUTE_EXPERTS.register("zero")
class ZeroExpert(nnx.Module):
  """MoE++'s zero expert (arXiv:2410.07348): E(x) = 0. No parameters."""

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    del d_model, rngs, param_dtype

  def __call__(self, x: jax.Array) -> jax.Array | None:
    """x: [T, D] -> None: nothing to add."""
    del x
    return None


@ZERO_COMPUTE_EXPERTS.register("copy")
class CopyExpert(nnx.Module):
  """MoE++'s copy expert (arXiv:2410.07348): E(x) = x. No parameters."""

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    del d_model, rngs, param_dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [T, D] float32 -> [T, D]."""
    return x


@ZERO_COMPUTE_EXPERTS.register("constant")
class ConstantExpert(nnx.Module):
  """MoE++'s constant expert (arXiv:2410.07348): E(x) = a_1 x + a_2 v with
  [a_1, a_2] = softmax(x W_c), W_c [D, 2] and a learned vector v [D]. Initialised as the
  authors' code does in spirit: v ~ N(0, 1), W_c with the fan-in scale D^-1/2 used for every
  matrix here."""

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.w_c = logical_param(rngs, (d_model, 2), d_model ** -0.5, ("embed", None), param_dtype)
    self.v = logical_param(rngs, (d_model,), 1.0, ("embed",), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [T, D] float32 -> [T, D] float32."""
    a = jax.nn.softmax(jnp.dot(x, self.w_c[...].astype(jnp.float32)), axis=-1)   # [T, 2]
    return a[:, :1] * x + a[:, 1:] * self.v[...].astype(jnp.float32)


def renormalize_without_null(expert_index: jax.Array, combine_weights: jax.Array,
                             null_start: int, null_stop: int) -> jax.Array:
  """AdaMoE's weights (arXiv:2406.13233; the authors' code): each slot's weight over the sum
  of the token's non-null slots, g'_k = g_k / sum_{j: i_j not in [null_start, null_stop)} g_j;
  null slots and tokens with no non-null slot get 0.

  Args:
    expert_index: [T, K] int32; combine_weights: [T, K] float32.
  Returns:
    combine_weights [T, K] float32.
  """
  null = (expert_index >= null_start) & (expert_index < null_stop)
  kept = jnp.where(null, 0.0, combine_weights)
  total = jnp.sum(kept, axis=-1, keepdims=True)
  return jnp.where(total > 0, kept / jnp.where(total > 0, total, 1.0), 0.0)


def zero_compute_lb_loss(router_probs: jax.Array, expert_index: jax.Array,
                         token_mask: jax.Array, num_groups: int, eta: jax.Array) -> jax.Array:
  """Switch loss with per-expert weights, E' sum_i eta_i f_i P_i (MoE++'s heterogeneous
  load-balancing loss, arXiv:2410.07348, with eta_i = tau for zero-computation
  experts); eta = 1 everywhere is `balance.load_balancing_loss`. Since P_i is a mean of
  probabilities, eta_i P_i is the mean of eta_i p_i and the weighted loss is the plain one on
  eta-scaled probabilities.

  Args:
    router_probs: [T, E']; expert_index: [T, K] (E': no expert); token_mask: [T] bool;
    num_groups: the `balance_groups` n; eta: [E'] float32.
  """
  return balance.load_balancing_loss(router_probs.astype(jnp.float32) * eta, expert_index,
                                     token_mask, num_groups)


class ZeroComputeExperts(nnx.Module):
  """The N null experts and the `extra_experts` of one layer, router outputs E .. E' - 1.

  Args:
    d_model: D; num_experts: E, the real experts (outputs 0 .. E - 1).
    num_null: N null experts (outputs E .. E + N - 1).
    kinds: `ZERO_COMPUTE_EXPERTS` names, one per further output (E + N + j).
  """

  def __init__(self, d_model: int, num_experts: int, num_null: int, kinds: tuple[str, ...], *,
               rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.num_experts, self.num_null, self.kinds = num_experts, num_null, tuple(kinds)
    self.experts = nnx.List([ZERO_COMPUTE_EXPERTS[k](d_model, rngs=rngs, param_dtype=param_dtype)
                             for k in self.kinds])

  @property
  def num_outputs(self) -> int:
    """N + X: router outputs past the real experts."""
    return self.num_null + len(self.kinds)

  def eta(self, tau: float) -> jax.Array:
    """[E'] weights of the heterogeneous balance loss: 1 for real experts, tau for the rest."""
    return jnp.concatenate([jnp.ones((self.num_experts,), jnp.float32),
                            jnp.full((self.num_outputs,), tau, jnp.float32)])

  def resolve(self, x: jax.Array, expert_index: jax.Array, combine_weights: jax.Array):
    """Resolves the zero-computation slots of a routing decision.

    y0 = sum_k g'_k E_{i_k}(x) over the slots with E <= i_k < E' (g' renormalised without the
    null slots when N > 0); those slots become (E, 0), as does the router's own "no expert"
    index E'.

    Args:
      x: [T, D] tokens; expert_index: [T, K] in [0, E'] (E': no expert); combine_weights: [T, K].
    Returns:
      (expert_index [T, K] in [0, E], combine_weights [T, K] float32, y0 [T, D] float32,
       zero-computation copies (a float32 scalar)).
    """
    e, stop = self.num_experts, self.num_experts + self.num_outputs
    weights = combine_weights.astype(jnp.float32)
    if self.num_null:
      weights = renormalize_without_null(expert_index, weights, e, e + self.num_null)
    xf = x.astype(jnp.float32)
    y0 = jnp.zeros(xf.shape, jnp.float32)
    for j, expert in enumerate(self.experts):
      g = jnp.sum(jnp.where(expert_index == e + self.num_null + j, weights, 0.0), axis=-1)  # [T]
      out = expert(xf)
      if out is not None:
        y0 = y0 + g[:, None] * out
    zero = (expert_index >= e) & (expert_index < stop)
    copies = jnp.sum(zero).astype(jnp.float32)
    real = expert_index < e
    return (jnp.where(real, expert_index, e).astype(jnp.int32), jnp.where(real, weights, 0.0),
            y0, copies)
