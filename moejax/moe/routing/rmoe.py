"""Layerwise recurrent router: a GRU carries the routing state from MoE layer to MoE layer.

"Layerwise Recurrent Router for Mixture-of-Experts", Qiu et al. 2024, arXiv:2408.06793. Layer i
projects its token x_i [D] to u_i = x_i W_in^(i) [H], runs one GRU step from the previous MoE
layer's state h_{i-1} [H] (zeros at the first MoE layer) and reads the logits off the new state:

  u_i = x_i W_in^(i)                                   W_in^(i): [D, H], per layer
  r   = sigmoid(u_i W_xr + b_xr + h_{i-1} W_hr + b_hr)   (reset gate)
  z   = sigmoid(u_i W_xz + b_xz + h_{i-1} W_hz + b_hz)   (update gate)
  n   = tanh(u_i W_xn + b_xn + r * (h_{i-1} W_hn + b_hn))
  h_i = (1 - z) * n + z * h_{i-1}
  logits_i = h_i W_out^(i)                             W_out^(i): [H, E], per layer

then softmax and top-k as the `topk` router. The wiring (a per-layer input projection and output
gate around a GRU cell whose input and state are both H wide, biases on every gate, the PyTorch
GRUCell form above) is the authors' reference implementation (github.com/qiuzh20/RMoE,
`llama_moe_rnn`), where one GRU cell is shared by all layers.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.errors import ConfigError
from moejax.moe.routing.base import ROUTERS
from moejax.moe.routing.topk import TopKRouter
from moejax.params import logical_param, zeros_param

STATE = "rmoe_state"    # the carry key of the GRU state [T, H]


def gru_cell(u: jax.Array, h: jax.Array, w_x: jax.Array, w_h: jax.Array, b_x: jax.Array,
             b_h: jax.Array) -> jax.Array:
  """One GRU step (Cho et al. 2014, "Learning Phrase Representations using RNN Encoder-Decoder
  for Statistical Machine Translation", arXiv:1406.1078; PyTorch's GRUCell form, with the reset
  gate applied after the state's matmul), in float32.

  Args:
    u: [T, H] input; h: [T, H] previous state.
    w_x, w_h: [H, 3, H], the (reset, update, new) gates' input and state weights.
    b_x, b_h: [3, H] their biases.
  Returns:
    the new state [T, H].
  """
  f32 = lambda a: a.astype(jnp.float32)
  gx = jnp.einsum("ti,igj->tgj", f32(u), f32(w_x)) + f32(b_x)                 # [T, 3, H]
  gh = jnp.einsum("ti,igj->tgj", f32(h), f32(w_h)) + f32(b_h)                 # [T, 3, H]
  r = jax.nn.sigmoid(gx[:, 0] + gh[:, 0])
  z = jax.nn.sigmoid(gx[:, 1] + gh[:, 1])
  n = jnp.tanh(gx[:, 2] + r * gh[:, 2])
  return (1.0 - z) * n + z * f32(h)


class GRUCell(nnx.Module):
  """The weights of one GRU cell of width H (`gru_cell`): w_x, w_h [H, 3, H], b_x, b_h [3, H]."""

  def __init__(self, hidden: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    names = ("router_hidden", None, "router_hidden")
    self.w_x = logical_param(rngs, (hidden, 3, hidden), hidden ** -0.5, names, param_dtype)
    self.w_h = logical_param(rngs, (hidden, 3, hidden), hidden ** -0.5, names, param_dtype)
    self.b_x = zeros_param((3, hidden), (None, "router_hidden"), param_dtype)
    self.b_h = zeros_param((3, hidden), (None, "router_hidden"), param_dtype)

  def __call__(self, u: jax.Array, h: jax.Array) -> jax.Array:
    """u, h: [T, H] -> the new state [T, H] float32."""
    return gru_cell(u, h, self.w_x[...], self.w_h[...], self.b_x[...], self.b_h[...])


@ROUTERS.register("rmoe")
class RecurrentRouter(TopKRouter):
  """RMoE's layerwise recurrent router (Qiu et al. 2024, arXiv:2408.06793). logits_i = GRU(x_i
  W_in, h_{i-1}) W_out: the GRU state h [T, H] (`hidden_size`, default 32) travels from MoE
  layer to MoE layer in the routing carry (`rmoe_state`; zeros at the first MoE layer, and
  dense layers hand it on unchanged), so a layer's routing depends on the token's routing
  history over depth. Softmax, top-k, `renormalize` and loss-free balancing as `topk`.

  Sharing: the paper's GRU cell is one module shared by all layers. Each layer's router builds
  its own cell; in a model, `MoELayer.link` calls `link(routers, index)`, which makes every
  router use the first one's (nnx then keeps a single copy of it in the state, under the first
  MoE layer's path). A router used alone keeps its own cell.

  Routing state for tools: a layer's true logits are in `Routing.carry["router_logits"]`;
  `logits(x)` alone (no carry) gives those of a layer with no previous state (the first).
  """

  has_gate = False        # no linear gate W [D, E]: W_in, the GRU and W_out replace it

  def __init__(self, d_model: int, num_experts: int, top_k: int, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32, hidden_size: int = 32, **common):
    if not (isinstance(hidden_size, int) and not isinstance(hidden_size, bool)
            and hidden_size > 0):
      raise ConfigError("model.moe.router_args.hidden_size", hidden_size,
                        "a positive integer (H, the width of the GRU state)")
    super().__init__(d_model, num_experts, top_k, rngs=rngs, param_dtype=param_dtype, **common)
    self.hidden_size = hidden_size
    self.w_in = logical_param(rngs, (d_model, hidden_size), d_model ** -0.5,
                              ("embed", "router_hidden"), param_dtype)
    self.gru = GRUCell(hidden_size, rngs=rngs, param_dtype=param_dtype)
    self.w_out = logical_param(rngs, (hidden_size, num_experts), hidden_size ** -0.5,
                               ("router_hidden", "expert"), param_dtype)

  def link(self, routers: list, index: int) -> None:
    """Share one GRU cell over depth, as the paper: `routers` are the model's routers in depth
    order, this one at `index`; all of them take the first one's cell (a shared reference)."""
    if index > 0 and isinstance(routers[0], RecurrentRouter):
      self.gru = routers[0].gru

  def carry_logits(self, x, carry, *, train, rng):
    """x: [T, D], carry: {"rmoe_state": h_{i-1} [T, H]} (absent: zeros) -> (logits [T, E]
    float32, {"router_logits": logits, "rmoe_state": h_i [T, H]})."""
    del train, rng
    u = jnp.dot(x.astype(jnp.float32), self.w_in[...].astype(jnp.float32))       # [T, H]
    h_prev = carry.get(STATE)
    if h_prev is None:
      h_prev = jnp.zeros_like(u)
    h = self.gru(u, h_prev)
    logits = jnp.dot(h, self.w_out[...].astype(jnp.float32))
    return logits, {"router_logits": logits, STATE: h}

  def logits(self, x, *, train, rng):
    """x: [T, D] -> the logits [T, E] of a layer with no previous state (zeros)."""
    return self.carry_logits(x, {}, train=train, rng=rng)[0]
