"""Heterogeneous expert widths: "HMoE: Heterogeneous Mixture of Experts for Language Modeling",
Wang et al. 2024, arXiv:2408.10681.

`model.moe.expert_widths` = (F_0, ..., F_{E-1}) gives expert e a hidden width F_e instead of the
common d_ff / G. The grouped matmul takes one width, so the bank is stored at F = max_e F_e and
a fixed mask m [E, F], m[e, f] = 1 if f < F_e else 0, multiplies every weight on its F axis
before dispatch:
    W_in[e] <- W_in[e] * m[e][None, :]   ([D, F], each D -> F matrix)
    W_down[e] <- W_down[e] * m[e][:, None]   ([F, D])
so expert e computes exactly the FFN of its first F_e hidden units, the padded units are 0, and
(the mask being a constant factor) their weights get a gradient of exactly 0. They are stored as
zeros from the start, so weight decay leaves them at 0 too. Expert e's W_down is initialised
with its own fan-in, std F_e^-1/2.

Cost: every copy is multiplied at width F = max F_e, so the expert FLOPs are those of a
uniform bank of width max F_e, not of the mean width. Measured (layer fwd+bwd, T=2048, D=128,
E=8, top-2, dropless `blocked` gmm, one CPU device, 2 shared cores, median of 30): widths
(64, 128, 192, 256, 256, 320, 384, 448) padded to 448 took 112-149 ms, a uniform bank of the
same parameters (F=256) 48 ms, a uniform bank at F=448 121-142 ms: padding costs what the
widest uniform bank costs (1.75x the FLOPs here, 2.3-3.1x the time). Width classes (one
grouped matmul per distinct width) would avoid that; padding keeps one bank and one dispatch.

The paper's parameter penalty (P-Penalty) loss steers tokens towards smaller experts: each
expert's term of the Switch load-balancing loss is scaled by its size,
    L_pp = E sum_e (F_e / mean_j F_j) f_e P_e,
f_e the fraction of routed copies sent to e and P_e its mean router probability; for equal
widths it is the Switch loss. Weighted by `model.moe.param_penalty_weight` (0: off). (The
normalisation by the mean width is ours, so that equal widths give the Switch loss exactly.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax.errors import ConfigError
from moejax.moe import balance


def expert_widths(model: ml_collections.ConfigDict) -> tuple[int, ...]:
  """`model.moe.expert_widths` as a tuple of E ints; () when unset (all experts d_ff / G)."""
  return tuple(int(w) for w in model.moe.get("expert_widths", ()) or ())


def check_widths(model: ml_collections.ConfigDict, num_experts: int) -> None:
  """Raises ConfigError unless `expert_widths` is () or E positive integers."""
  widths = model.moe.get("expert_widths", ()) or ()
  ok = isinstance(widths, (tuple, list)) and all(
      isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths)
  if not ok or widths and len(widths) != num_experts:
    raise ConfigError("model.moe.expert_widths", widths,
                      f"() or a tuple of {num_experts} positive integers (one hidden width per "
                      "expert, model.moe.num_experts * granularity of them)")
  weight = model.moe.get("param_penalty_weight", 0.0)
  if not (isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight >= 0):
    raise ConfigError("model.moe.param_penalty_weight", weight, "a number >= 0")


def width_mask(widths: tuple[int, ...]) -> np.ndarray:
  """m [E, F] float32, F = max(widths): 1 on expert e's first F_e hidden units, else 0."""
  return (np.arange(max(widths))[None, :] < np.asarray(widths)[:, None]).astype(np.float32)


def mask_weights(w: dict, widths: tuple[int, ...]) -> dict:
  """w {name: [E, D, F] / [E, F, D] (`down`)} -> the same with each expert's units past F_e
  zeroed (a constant factor: zero gradient there)."""
  m = width_mask(widths)
  return {n: v * jnp.asarray(m[:, :, None] if n == "down" else m[:, None, :], v.dtype)
          for n, v in w.items()}


def init_widths(bank, widths: tuple[int, ...]) -> None:
  """Sets an `ExpertBank` built at width max(widths) to its heterogeneous start: padded units
  zero, expert e's `down` rescaled from std F^-1/2 to its own fan-in F_e^-1/2."""
  scale = np.sqrt(max(widths) / np.asarray(widths, np.float64)).astype(np.float32)
  masked = mask_weights(bank.weights(), widths)
  for n, p in bank.w.items():
    value = masked[n]
    if n == "down":
      value = value * jnp.asarray(scale[:, None, None], value.dtype)
    p.set_value(value)


def param_penalty_loss(router_probs: jax.Array, expert_index: jax.Array, token_mask: jax.Array,
                       num_groups: int, widths: tuple[int, ...]) -> jax.Array:
  """HMoE's P-Penalty, E sum_e (F_e / mean F) f_e P_e over the real experts (module docstring).

  Args:
    router_probs: [T, E'] (E' >= E: zero-computation outputs come last and weigh 1);
    expert_index: [T, K] (index >= E' : no expert); token_mask: [T] bool; num_groups: the
    `balance_groups` n; widths: the E widths.
  """
  w = np.asarray(widths, np.float64)
  scale = np.ones(router_probs.shape[-1], np.float32)
  scale[:len(widths)] = w / w.mean()
  return balance.load_balancing_loss(router_probs.astype(jnp.float32) * jnp.asarray(scale),
                                     expert_index, token_mask, num_groups)
