"""Routing over depth and cross-layer reuse (issue 13, part B): the RMoE recurrent router, ReXMoE's
expert pools over neighbouring layers and the router-free Autonomy-of-Experts layer, each against
a float64 numpy reference of its paper's equations.

rmoe's 1-vs-8-device equality, contract and batch independence are in tests/test_router_zoo.py
(parametrised over every router)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import sharding
from moejax.config import validate_model
from moejax.model import Transformer
from moejax.moe import MoELayer
from moejax.moe.dispatch import dispatch
from moejax.moe.variants.aoe import AoELayer
from moejax.moe.variants.rexmoe import pool_window

import reference as ref
from helpers import load_config

B, S, D, V, E, K = 8, 8, 16, 32, 8, 2          # T = 64 tokens, 8 per device on 8


def _model_config(**over):
  m = load_config(**{"model.vocab_size": V, "model.d_model": D, "model.num_layers": 2,
                     "model.num_heads": 2, "model.num_kv_heads": 2, "model.head_dim": 8,
                     "model.d_ff": 16, "model.moe.num_experts": E, "model.moe.top_k": K,
                     **over}).model
  return validate_model(m)


def _fill(module, seed=0):
  """The module's variables drawn in numpy (building eagerly would compile one random kernel
  per parameter shape): N(0, 1/fan_in) weights, small random biases, unit norm scales."""
  rng = np.random.default_rng(seed)
  for _, v in nnx.iter_graph(module):
    if not isinstance(v, nnx.Variable):
      continue
    if v.get_metadata("out_sharding", None) == ("embed",):            # RMSNorm scale
      value = np.ones(v.shape)
    elif len(v.shape) >= 2 and v.get_metadata("out_sharding", None)[0] is not None:
      value = rng.standard_normal(v.shape) * v.shape[-2] ** -0.5
    else:                                                             # biases
      value = 0.3 * rng.standard_normal(v.shape)
    v.set_value(jnp.asarray(value, v.dtype))
  return module


def _build(cls, *args, seed=0):
  return _fill(nnx.eval_shape(lambda: cls(*args, rngs=nnx.Rngs(0))), seed)


def _tokens(seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, (B, S)), jnp.int32)


def _f64(a):
  return np.asarray(a, np.float64)


def _top_k_rows(scores, k):
  """Float64 top-k (ties: lower index) and, per row, the gap between the k-th chosen score and
  the best unchosen one."""
  order = np.argsort(-scores, axis=-1, kind="stable")
  top = np.take_along_axis(scores, order, -1)
  return order[:, :k], top[:, k - 1] - top[:, k]


# ----------------------------------------------------------------------------- rmoe


def _np_gru(u, h, cell):
  """GRU step in float64 (arXiv:2408.06793, the reference code's PyTorch GRUCell form)."""
  w_x, w_h, b_x, b_h = (_f64(getattr(cell, n)[...]) for n in ("w_x", "w_h", "b_x", "b_h"))
  gx = np.einsum("ti,igj->tgj", u, w_x) + b_x
  gh = np.einsum("ti,igj->tgj", h, w_h) + b_h
  r, z = ref.sigmoid(gx[:, 0] + gh[:, 0]), ref.sigmoid(gx[:, 1] + gh[:, 1])
  n = np.tanh(gx[:, 2] + r * gh[:, 2])
  return (1 - z) * n + z * h


@functools.partial(jax.jit, static_argnums=0)
def _recorded_routes(graphdef, state, inputs):
  """The model's forward with each MoE layer's router input, incoming carry and `Routing`
  recorded (`MoELayer.route` wrapped while tracing)."""
  model, records, original = nnx.merge(graphdef, state), [], MoELayer.route

  def route(self, x, *args, **kwargs):
    routing = original(self, x, *args, **kwargs)
    records.append((x, dict(kwargs.get("carry") or {}), routing))
    return routing

  MoELayer.route = route
  try:
    model(inputs)
  finally:
    MoELayer.route = original
  return records


@functools.lru_cache(maxsize=None)
def _rmoe():
  m = _model_config(**{"model.moe.router": "rmoe"})
  m.moe.router_args.hidden_size = 8
  model = _build(Transformer, m)
  records = jax.tree.map(np.asarray, _recorded_routes(*nnx.split(model), _tokens()))
  return model, records


def test_rmoe_second_layer_logits_follow_a_float64_gru_over_depth():
  model, [(x1, c1, r1), (x2, c2, r2)] = _rmoe()
  routers = [block.ffn.router for block in model.blocks]
  assert c1 == {}                                                      # first MoE layer
  np.testing.assert_array_equal(c2["rmoe_state"], r1.carry["rmoe_state"])   # threaded by the model
  h1 = _np_gru(_f64(x1) @ _f64(routers[0].w_in[...]), np.zeros((B * S, 8)), routers[0].gru)
  h2 = _np_gru(_f64(x2) @ _f64(routers[1].w_in[...]), h1, routers[1].gru)
  logits2 = h2 @ _f64(routers[1].w_out[...])
  np.testing.assert_allclose(r1.carry["rmoe_state"], h1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(r2.carry["router_logits"], logits2, rtol=1e-5, atol=1e-5)
  probs = ref.softmax(logits2)
  idx, gap = _top_k_rows(probs, K)
  clear = gap > 1e-5
  np.testing.assert_array_equal(r2.expert_index[clear], idx[clear])
  np.testing.assert_allclose(r2.combine_weights[clear],
                             np.take_along_axis(probs, idx, -1)[clear], rtol=1e-5)


@functools.partial(jax.jit, static_argnums=0)
def _route_with_state(graphdef, state, x, h):
  return nnx.merge(graphdef, state)(x, carry={"rmoe_state": h})


def test_rmoe_previous_state_changes_routing_with_the_token_fixed():
  model, [(_, _, r1), (x2, _, r2)] = _rmoe()
  split = nnx.split(model.blocks[1].ffn.router)
  h1 = r1.carry["rmoe_state"]
  same = _route_with_state(*split, x2, h1)
  np.testing.assert_array_equal(same.expert_index, r2.expert_index)
  # The state of a first layer (zeros), and another token's state.
  for other in (np.zeros_like(h1), np.roll(h1, 1, axis=0)):
    moved = np.asarray(_route_with_state(*split, x2, other).expert_index)
    assert (moved != r2.expert_index).any(axis=1).mean() > 0.2


def test_rmoe_link_shares_one_gru_cell():
  """The paper's shared GRU: the model links its routers, so every router holds the first one's
  cell, the model's state keeps one copy of it, and the parameter count is the unlinked routers'
  less the other layers' cells."""
  m = _model_config(**{"model.moe.router": "rmoe", "model.num_layers": 3})
  model = nnx.eval_shape(lambda: Transformer(m, rngs=nnx.Rngs(0)))
  size = lambda module: sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
  routers = [block.ffn.router for block in model.blocks]
  assert all(router.gru is routers[0].gru for router in routers)
  paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
  assert sum(p.endswith("gru/w_x") for p in paths) == 1
  cell = size(routers[0].gru)
  assert cell == 2 * 3 * 32 * 32 + 2 * 3 * 32
  router_params = sum(v.size for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
                      if "/router/" in "/".join(map(str, p)))
  assert router_params == sum(size(r) for r in routers) - (len(routers) - 1) * cell


# ----------------------------------------------------------------------------- rexmoe


def test_rexmoe_pool_windows_clamp_at_the_ends():
  assert [pool_window(i, 3, 1) for i in range(3)] == [(0, 3)] * 3
  assert [pool_window(i, 5, 1) for i in range(5)] == [(0, 3), (0, 3), (1, 3), (2, 3), (2, 3)]
  assert [pool_window(i, 2, 1) for i in range(2)] == [(0, 2)] * 2        # fewer layers than 2r+1
  assert pool_window(3, 5, 0) == (3, 1)                                  # r = 0: its own experts


def _rexmoe_config(**over):
  return _model_config(**{"model.num_layers": 3, "model.moe.layer": "rexmoe",
                          "model.moe.reuse_range": 1, **over})


@functools.partial(jax.jit, static_argnums=0)
def _rexmoe_step(graphdef, state, x, forced):
  """Layer 0's routing, output and d sum(y) / d state; and its pool run with token t sent to
  pool index forced[t] with weight 1."""
  def loss(state):
    layer = nnx.merge(graphdef, state)
    y, aux, metrics = layer(x)
    return jnp.sum(y), (layer.route(x.reshape(-1, D)), y)
  (_, (routing, y)), grads = jax.value_and_grad(loss, has_aux=True)(state)
  layer = nnx.merge(graphdef, state)
  y_forced, _ = dispatch(x.reshape(-1, D), forced[:, None], jnp.ones((B * S, 1)),
                         layer.expert_weights(), ffn=layer.experts.ffn, plan=layer.plan)
  return routing, y, grads, y_forced


@functools.lru_cache(maxsize=None)
def _rexmoe():
  model = _build(Transformer, _rexmoe_config())
  x = np.random.default_rng(1).standard_normal((B, S, D)).astype(np.float32)
  forced = np.arange(B * S, dtype=np.int32) % (3 * E)                  # every pool index
  layer = model.blocks[0].ffn
  out = jax.tree.map(np.asarray, _rexmoe_step(*nnx.split(layer), jnp.asarray(x),
                                              jnp.asarray(forced)))
  return model, x.reshape(-1, D), forced, out


def _bank_ffn(model, layer, expert, x):
  """Float64 FFN of expert `expert` of MoE layer `layer`'s own bank (read from that layer)."""
  w = {n: _f64(p[...])[int(expert)] for n, p in model.blocks[int(layer)].ffn.experts.w.items()}
  return ref.ffn(_f64(x), w, "swiglu")


def test_rexmoe_pool_index_runs_the_neighbours_expert():
  model, x, forced, (routing, y, _, y_forced) = _rexmoe()
  layer = model.blocks[0].ffn
  assert layer.router.num_experts == 3 * E and layer.pool_start == 0
  assert all(layer.pool[j] is model.blocks[j].ffn.experts for j in range(3))   # shared, not copied
  want = np.stack([_bank_ffn(model, j // E, j % E, x[t:t + 1])[0] for t, j in enumerate(forced)])
  np.testing.assert_allclose(y_forced, want, rtol=1e-4, atol=1e-5)
  # The routed output: sum_k w_k FFN_{pool[i_k]}(x), the pool read from the neighbours' layers.
  idx, w = routing.expert_index, routing.combine_weights
  assert (idx >= E).any() and (idx >= 2 * E).any()                    # neighbours do get tokens
  want = sum(w[:, k:k + 1] * np.stack([_bank_ffn(model, j // E, j % E, x[t:t + 1])[0]
                                       for t, j in enumerate(idx[:, k])]) for k in range(K))
  np.testing.assert_allclose(y.reshape(-1, D), want, rtol=1e-4, atol=1e-5)


def test_rexmoe_gradients_reach_exactly_the_used_neighbour_experts():
  model, _, _, (routing, _, grads, _) = _rexmoe()
  used = np.zeros(3 * E, bool)
  used[routing.expert_index.ravel()] = True
  banks = {0: grads["experts"]["w"], 1: grads["pool"][1]["w"], 2: grads["pool"][2]["w"]}
  for b, w in banks.items():
    moved = np.abs(np.asarray(w["down"])).reshape(E, -1).max(-1) > 0
    np.testing.assert_array_equal(moved, used[b * E:(b + 1) * E], err_msg=f"bank of layer {b}")


def test_rexmoe_adds_only_the_wider_routers():
  def count(m):
    model = nnx.eval_shape(lambda: Transformer(m, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  plain = count(_model_config(**{"model.num_layers": 3}))
  assert count(_rexmoe_config()) == plain + 3 * D * (3 - 1) * E
  assert count(_rexmoe_config(**{"model.moe.reuse_range": 0})) == plain


# ----------------------------------------------------------------------------- aoe


@functools.partial(jax.jit, static_argnums=0)
def _aoe_step(graphdef, state, x, segment_ids):
  def loss(state):
    layer = nnx.merge(graphdef, state)
    y, aux, metrics = layer(x, segment_ids)
    _, norms, _, index, gates = layer.select(x.reshape(-1, D), segment_ids.reshape(-1) > 0)
    return jnp.sum(y) + aux, (y, aux, metrics, norms, index, gates)
  (_, out), grads = jax.value_and_grad(loss, has_aux=True)(state)
  return out, grads


def _aoe_inputs():
  x = np.random.default_rng(2).standard_normal((B, S, D)).astype(np.float32)
  seg = np.ones((B, S), np.int32)
  seg[-1, -3:] = 0                                                      # padding
  return x, seg


@functools.lru_cache(maxsize=None)
def _aoe(mesh_devices=1):
  m = _model_config(**{"model.moe.layer": "aoe", "model.moe.aoe_rank": 4})
  mesh = None
  x, seg = _aoe_inputs()
  args = [jnp.asarray(x), jnp.asarray(seg)]
  if mesh_devices > 1:
    mesh = sharding.make_mesh(load_config(**{"mesh.data": mesh_devices}).mesh, jax.devices())
    spec = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(("batch",), None, mesh))
    args = [jax.device_put(a, spec) for a in args]
  layer = _build(lambda model, rngs: AoELayer(model, rngs=rngs, mesh=mesh), m)
  return layer, jax.tree.map(np.asarray, _aoe_step(*nnx.split(layer), *args))


def _aoe_reference(layer, x, live):
  """AoE in float64 (arXiv:2501.13074): h = x A_e, p = softmax(||h||), top-K of p, gates p,
  y = sum_k g (silu(h B) * x U) W_down."""
  a = _f64(layer.a[...])
  w = {n: _f64(p[...]) for n, p in layer.w.items()}
  h = np.einsum("td,edr->ter", x, a)
  probs = ref.softmax(np.linalg.norm(h, axis=-1))
  idx, gap = _top_k_rows(probs, K)
  y = np.zeros_like(x)
  for t in np.flatnonzero(live):
    for e in idx[t]:
      y[t] += probs[t, e] * ((ref.silu(h[t, e] @ w["gate"][e]) * (x[t] @ w["up"][e]))
                             @ w["down"][e])
  return idx, gap, probs, y


def test_aoe_selects_the_top_k_activation_norms_and_matches_float64():
  layer, ((y, aux, metrics, norms, index, gates), grads) = _aoe()
  x, seg = _aoe_inputs()
  live = seg.reshape(-1) > 0
  idx, gap, probs, want = _aoe_reference(layer, _f64(x).reshape(-1, D), live)
  h = np.einsum("td,edr->ter", _f64(x).reshape(-1, D), _f64(layer.a[...]))
  np.testing.assert_allclose(norms, np.linalg.norm(h, axis=-1), rtol=1e-5)
  clear = live & (gap > 1e-6)
  assert clear.sum() > 0.9 * live.sum()
  np.testing.assert_array_equal(index[clear], idx[clear])
  np.testing.assert_allclose(gates[live], np.take_along_axis(probs, idx, -1)[live], rtol=1e-5)
  assert (index[~live] == E).all() and (gates[~live] == 0).all()
  np.testing.assert_allclose(y.reshape(-1, D), want, rtol=1e-4, atol=1e-5)
  # The usual metrics, no router parameters, and gradients into A through gates and h.
  assert float(metrics["dropped_frac"]) == 0.0
  np.testing.assert_allclose(metrics["experts_per_token"], K, rtol=1e-6)
  np.testing.assert_allclose(metrics["load"], np.bincount(idx[live].ravel(), minlength=E)
                             / (K * live.sum()), rtol=1e-6)
  f = np.bincount(idx[live].ravel(), minlength=E) / (K * live.sum())
  np.testing.assert_allclose(metrics["lb_loss"], E * np.sum(f * probs[live].mean(0)), rtol=1e-5)
  np.testing.assert_allclose(aux, 0.01 * metrics["lb_loss"], rtol=1e-6)
  assert not hasattr(layer, "router")
  assert (np.abs(grads["a"]).reshape(E, -1).max(-1) > 0).all()          # every expert's A learns


def test_aoe_eight_devices_equal_one():
  _, ((y1, aux1, m1, *_), _) = _aoe()
  _, ((y8, aux8, m8, *_), _) = _aoe(8)
  np.testing.assert_allclose(y8, y1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux8, aux1, rtol=1e-5)
  for key in m1:
    np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("layer, field, value", [
    ("aoe", "model.moe.aoe_rank", 0), ("aoe", "model.moe.dispatch", "capacity"),
    ("aoe", "model.moe.bias_update_rate", 0.01), ("rexmoe", "model.moe.reuse_range", -1),
    ("rexmoe", "model.moe.chain_iterations", 2)])
def test_bad_options_name_their_field(layer, field, value):
  from moejax.errors import ConfigError
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    _model_config(**{"model.moe.layer": layer, field: value})
