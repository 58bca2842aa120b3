"""Tests for the variants inside the sparse MoE layer (moejax.moe.layer.MoELayer options):
zero-computation experts (AdaMoE's null experts, MoE++'s zero/copy/constant experts), MoE++'s
gating residual, Chain-of-Experts iterations and HMoE's heterogeneous expert widths.

Each compares against a float64 numpy reference written here from the papers' equations, over
the layer's own weights (drawn in numpy), and checks the exact properties: zero-computation
copies never reach dispatch, padded hidden units are exactly zero with zero gradient, C = 1 is
the plain layer bit for bit.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax.moe.layer as layer_module
from moejax.config import validate
from moejax.errors import ConfigError
from moejax.model import Transformer
from moejax.moe import ExpertBank, MoELayer, heterogeneous
from moejax.moe.extra_experts import ZeroComputeExperts
from moejax.sharding import make_mesh

import reference as ref
from helpers import load_config, set_fields

D, F, E, K = 16, 32, 4, 2
B, S = 2, 16


def _model(**moe):
  """configs/default.py's `model` shrunk to D=16, F=32, E=4, top-2, with model.moe overrides."""
  model = load_config(**{"model.d_model": D, "model.d_ff": F, "model.vocab_size": 32,
                         "model.num_heads": 2, "model.num_kv_heads": 2, "model.head_dim": 8,
                         "model.moe.num_experts": E, "model.moe.top_k": K,
                         "model.moe.gmm_backend": "ragged_dot"}).model
  return set_fields(model, {f"moe.{k}": v for k, v in moe.items()})


def _fill(module, seed):
  """Every parameter of `module` drawn in numpy: normal, std fan_in^-1/2 for matrices (fan-in
  the second-to-last axis), std 1 for vectors."""
  rng = np.random.default_rng(seed)
  for _, p in nnx.iter_graph(module):
    if isinstance(p, nnx.Param):
      std = p.shape[-2] ** -0.5 if len(p.shape) > 1 else 1.0
      p.set_value(jnp.asarray(rng.standard_normal(p.shape) * std, p.dtype))
  return module


def _layer(model, seed, mesh=None):
  return _fill(nnx.eval_shape(lambda: MoELayer(model, rngs=nnx.Rngs(0), mesh=mesh)), seed)


def f64(p):
  return np.asarray(p[...], np.float64)


def _close(got, want, rtol=1e-4, atol=1e-5):
  np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * max(1.0, np.abs(want).max()))


def _ffn(x, w, e, width=None):
  """Expert e of the bank `w` {name: [E, ...]} on x [N, D] in float64 (first `width` units)."""
  f = slice(None) if width is None else slice(0, width)
  return ref.ffn(x, {"gate": w["gate"][e][:, f], "up": w["up"][e][:, f],
                     "down": w["down"][e][f]}, "swiglu")


def _switch(probs, idx, mask, eta=None):
  """E' sum_i eta_i f_i P_i over the routed tokens (float64)."""
  n = probs.shape[1]
  eta = np.ones(n) if eta is None else eta
  f = np.bincount(idx[mask].ravel(), minlength=n + 1)[:n] / (mask.sum() * idx.shape[1])
  return n * np.sum(eta * f * probs[mask].mean(0))


@functools.partial(jax.jit, static_argnums=0)
def _spied_forward(graphdef, state, x, segment_ids):
  """The layer's forward, plus the `expert_index` it hands to dispatch and its raw routing."""
  seen, real = {}, layer_module.dispatch

  def spy(xt, expert_index, *args, **kwargs):
    seen["index"] = expert_index
    return real(xt, expert_index, *args, **kwargs)

  layer_module.dispatch = spy
  try:
    layer = nnx.merge(graphdef, state)
    y, aux, metrics = layer(x, segment_ids)
  finally:
    layer_module.dispatch = real
  routing = layer.route(x.reshape(-1, x.shape[-1]), segment_ids.reshape(-1) > 0)
  return y, aux, metrics, routing, seen["index"]


# ----------------------------------------------------------------------------- zero-computation


def test_zero_computation_outputs_by_formula():
  """Hand-made slots over E=4 real experts, null (4), zero (5), copy (6), constant (7), none (8):
  null and zero add nothing, copy adds g x, constant adds g (a1 x + a2 v) with [a1, a2] =
  softmax(x W_c); null slots renormalise the others (AdaMoE); every such slot leaves as (E, 0)."""
  experts = _fill(nnx.eval_shape(lambda: ZeroComputeExperts(
      D, E, 1, ("zero", "copy", "constant"), rngs=nnx.Rngs(0))), seed=1)
  idx = np.array([[0, 4], [5, 4], [6, 1], [7, 6], [8, 8], [2, 3]], np.int32)
  g = np.array([[0.6, 0.3], [0.5, 0.2], [0.3, 0.6], [0.4, 0.1], [0.0, 0.0], [0.7, 0.2]])
  x = np.random.default_rng(2).standard_normal((6, D))
  gd, state = nnx.split(experts)
  out_idx, out_w, y0, copies = jax.jit(lambda s, *a: nnx.merge(gd, s).resolve(*a))(
      state, jnp.asarray(x, jnp.float32), jnp.asarray(idx), jnp.asarray(g, jnp.float32))
  # Weights renormalised over the non-null slots.
  null = idx == 4
  gn = np.where(null, 0.0, g)
  gn = np.where(gn.sum(1, keepdims=True) > 0, gn / np.maximum(gn.sum(1, keepdims=True), 1e-30), 0)
  const = experts.experts[2]
  a = ref.softmax(x @ f64(const.w_c))
  want = np.zeros_like(x)
  want[2] = gn[2, 0] * x[2]                                             # copy
  want[3] = gn[3, 0] * (a[3, :1] * x[3] + a[3, 1:] * f64(const.v)) + gn[3, 1] * x[3]
  _close(np.asarray(y0), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(y0)[[0, 1, 4, 5]], 0.0)     # null, zero, none, real
  np.testing.assert_array_equal(out_idx, np.where(idx < E, idx, E))
  np.testing.assert_allclose(out_w, np.where(idx < E, gn, 0.0), rtol=1e-6)
  assert float(copies) == 6                                             # indices 4..7


@pytest.fixture(scope="module")
def zero_case():
  """A layer with 1 null expert and MoE++'s zero, copy and constant experts (8 router
  outputs), tau = 0.5, on 2 x 16 tokens with 3 padding tokens."""
  model = _model(null_experts=1, extra_experts=("zero", "copy", "constant"),
                 zero_compute_lb_weight=0.5)
  layer = _layer(model, seed=3)
  x = jax.random.normal(jax.random.key(4), (B, S, D))
  seg = np.ones((B, S), np.int32)
  seg[1, -3:] = 0
  gd, state = nnx.split(layer)
  y, aux, metrics, routing, dispatched = _spied_forward(gd, state, x, jnp.asarray(seg))
  return dict(model=model, layer=layer, x=np.asarray(x, np.float64).reshape(-1, D),
              mask=seg.reshape(-1) > 0, y=np.asarray(y).reshape(-1, D), aux=aux,
              metrics=metrics, routing=routing, dispatched=np.asarray(dispatched))


def test_zero_computation_copies_never_reach_dispatch(zero_case):
  c = zero_case
  raw = np.asarray(c["routing"].expert_index)                            # [T, K] in [0, 8]
  assert ((raw >= E) & (raw < 8)).any() and (raw < E).any()              # both kinds routed
  d = c["dispatched"]
  assert d.max() <= E                                                    # only real or none
  np.testing.assert_array_equal(np.bincount(d.ravel(), minlength=E + 1)[:E],
                                np.bincount(raw[raw < E], minlength=E))
  routed = c["mask"].sum()
  m = c["metrics"]
  assert float(m["experts_per_token"]) == pytest.approx((raw < E).sum() / routed, rel=1e-6)
  zero = ((raw >= E) & (raw < 8)).sum()
  assert float(m["zero_compute_frac"]) == pytest.approx(zero / (zero + (raw < E).sum()), rel=1e-6)


def test_zero_computation_layer_matches_float64_reference(zero_case):
  """The whole resolved layer: routing over 8 outputs (softmax, top-2), AdaMoE renormalisation
  without the null slot, real experts' FFNs, zero/copy/constant outputs; and the heterogeneous
  load-balancing loss with tau = 0.5 on the 4 zero-computation outputs."""
  c = zero_case
  layer, x, mask = c["layer"], c["x"], c["mask"]
  idx, g, probs, margin = ref.route(x @ f64(layer.router.gate), "topk", K)
  assert margin > 1e-4
  np.testing.assert_array_equal(np.asarray(c["routing"].expert_index)[mask], idx[mask])
  null = idx == E
  gn = np.where(null, 0.0, g)
  gn = np.where(gn.sum(1, keepdims=True) > 0, gn / np.maximum(gn.sum(1, keepdims=True), 1e-30), 0)
  w = {n: f64(p) for n, p in layer.experts.w.items()}
  const = layer.zero_experts.experts[2]
  a = ref.softmax(x @ f64(const.w_c))
  want = np.zeros_like(x)
  for t in np.nonzero(mask)[0]:
    for k in range(K):
      e = idx[t, k]
      if e < E:
        want[t] += gn[t, k] * _ffn(x[t:t + 1], w, e)[0]
      elif e == E + 2:                                                    # copy
        want[t] += gn[t, k] * x[t]
      elif e == E + 3:                                                    # constant
        want[t] += gn[t, k] * (a[t, 0] * x[t] + a[t, 1] * f64(const.v))
  _close(c["y"], want)
  np.testing.assert_array_equal(c["y"][~mask], 0.0)
  eta = np.array([1.0] * E + [0.5] * 4)
  assert float(c["metrics"]["lb_loss"]) == pytest.approx(_switch(probs, idx, mask, eta), rel=1e-5)
  assert float(c["metrics"]["lb_loss"]) != pytest.approx(_switch(probs, idx, mask), rel=1e-3)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _mesh_forward(gd_capacity, gd_dropless, state, x):
  return nnx.merge(gd_capacity, state)(x)[0], nnx.merge(gd_dropless, state)(x)[0]


def test_zero_computation_on_8_device_mesh_capacity_and_expert_parallel(zero_case):
  """The same weights on a data 2 x expert 2 x tensor 2 mesh: capacity dispatch (routing
  groups of 4, room for every copy) and expert-parallel dropless dispatch give the one-device
  output."""
  c = zero_case
  mesh = make_mesh(set_fields(load_config().mesh, {"data": 2, "expert": 2, "tensor": 2}))
  overrides = dict(null_experts=1, extra_experts=("zero", "copy", "constant"),
                   zero_compute_lb_weight=0.5, routing_group=4)
  cap = nnx.eval_shape(lambda: MoELayer(_model(dispatch="capacity", capacity_factor=2.0,
                                               **overrides), rngs=nnx.Rngs(0), mesh=mesh))
  drop = nnx.eval_shape(lambda: MoELayer(_model(**overrides), rngs=nnx.Rngs(0), mesh=mesh))
  assert cap.plan.mesh is not None and drop.plan.expert_axis == "expert"
  state = nnx.split(c["layer"])[1]
  x = jnp.asarray(c["x"].reshape(B, S, D), jnp.float32)
  y_cap, y_drop = _mesh_forward(nnx.split(cap)[0], nnx.split(drop)[0], state, x)
  # zero_case has padding; without it every token is routed: compare with the one-device run.
  gd = nnx.split(c["layer"])[0]
  y_one = _spied_forward(gd, state, x, jnp.ones((B, S), jnp.int32))[0]
  _close(np.asarray(y_cap), np.asarray(y_one), rtol=1e-5, atol=1e-6)
  _close(np.asarray(y_drop), np.asarray(y_one), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- gating residual


def test_gating_residual_over_two_moe_layers():
  """MoE++: layer 1's logits are x1 W1 + L0 W_g1 with L0 = x0 W0 (no residual at the first MoE
  layer), read from the routing state each MoE layer hands on."""
  cfg = load_config(**{"model.d_model": D, "model.d_ff": F, "model.vocab_size": 32,
                       "model.num_layers": 2, "model.num_heads": 2, "model.num_kv_heads": 2,
                       "model.head_dim": 8, "model.moe.num_experts": E, "model.moe.top_k": K,
                       "model.moe.gmm_backend": "ragged_dot", "model.moe.gating_residual": True,
                       "mesh.data": 1, "train.seq_len": S, "train.batch_size": B})
  model = _fill(nnx.eval_shape(lambda: Transformer(validate(cfg).model, rngs=nnx.Rngs(0))), 5)
  inputs = jax.random.randint(jax.random.key(6), (B, S), 0, 32)

  @functools.partial(jax.jit, static_argnums=0)
  def run(graphdef, state, inputs):
    seen, real = [], MoELayer.route

    def spy(self, x, *args, **kwargs):
      routing = real(self, x, *args, **kwargs)
      seen.append((x, routing.carry["router_logits"]))
      return routing

    MoELayer.route = spy
    try:
      nnx.merge(graphdef, state)(inputs)
    finally:
      MoELayer.route = real
    return seen

  (x0, l0), (x1, l1) = run(*nnx.split(model), inputs)
  r0, r1 = model.blocks[0].ffn.router, model.blocks[1].ffn.router
  x0, l0, x1, l1 = (np.asarray(a, np.float64) for a in (x0, l0, x1, l1))
  _close(l0, x0 @ f64(r0.gate))
  _close(l1, x1 @ f64(r1.gate) + l0 @ f64(r1.residual_map))
  assert np.abs(l0 @ f64(r1.residual_map)).max() > 0.1


# ----------------------------------------------------------------------------- Chain-of-Experts


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, x):
  return nnx.merge(graphdef, state)(x)


def test_chain_of_one_iteration_is_the_plain_layer_bitwise():
  """Built from the same seed (the real initialisers, both in one compiled function), C = 1 has
  the plain layer's graph and parameters, bit for bit."""
  plain_model, chain_model = _model(), _model(chain_iterations=1)
  plain, chain1 = jax.jit(lambda: tuple(nnx.state(MoELayer(m, rngs=nnx.Rngs(0)))
                                        for m in (plain_model, chain_model)))()
  gd_plain, gd_chain = (nnx.graphdef(nnx.eval_shape(lambda m=m: MoELayer(m, rngs=nnx.Rngs(0))))
                        for m in (plain_model, chain_model))
  assert gd_plain == gd_chain
  assert jax.tree.structure(plain) == jax.tree.structure(chain1)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(chain1)):
    np.testing.assert_array_equal(a, b)
  # Equal graphs and parameters: the same compiled function, so the same outputs bit for bit.


def test_chain_of_two_iterations_matches_float64_reference():
  """C = 2 with a shared expert: x1 = x0 + MoE_1(x0), x2 = x1 + MoE_2(x1) (router 2 its own,
  experts and shared expert the same), y = x2 - x0; losses add, experts_per_token adds."""
  model = _model(chain_iterations=2, num_shared_experts=1)
  layer = _layer(model, seed=8)
  x = jax.random.normal(jax.random.key(9), (B, S, D))
  y, aux, metrics = _apply(*nnx.split(layer), x)
  w = {n: f64(p) for n, p in layer.experts.w.items()}
  shared = {n: f64(p) for n, p in layer.shared.w.items()}
  h = np.asarray(x, np.float64).reshape(-1, D)
  h0, lb = h.copy(), []
  for router in (layer.router, layer.chain_routers[0]):
    idx, g, probs, margin = ref.route(h @ f64(router.gate), "topk", K)
    assert margin > 1e-4
    out = ref.ffn(h, shared, "swiglu")
    for e in range(E):
      tok, slot = np.nonzero(idx == e)
      out[tok] += g[tok, slot, None] * _ffn(h[tok], w, e)
    lb.append(_switch(probs, idx, np.ones(len(h), bool)))
    h = h + out
  _close(np.asarray(y).reshape(-1, D), h - h0)
  assert float(metrics["experts_per_token"]) == pytest.approx(2 * K)
  assert float(metrics["lb_loss"]) == pytest.approx(np.mean(lb), rel=1e-5)
  np.testing.assert_allclose(float(aux), model.moe.lb_loss_weight * np.sum(lb)
                             + model.moe.z_loss_weight * 2 * float(metrics["z_loss"]), rtol=1e-5)
  assert set(metrics) >= {"load_iter0", "load_iter1"}


# ----------------------------------------------------------------------------- HMoE widths

WIDTHS = (8, 16, 24, 32)


def test_heterogeneous_experts_compute_their_first_units_with_zero_grad_beyond():
  """Expert e of width F_e computes the FFN of its first F_e units, though the stored padding
  is random here; the padded units get exactly zero gradient; P-Penalty and active_width by
  formula."""
  model = _model(expert_widths=WIDTHS, param_penalty_weight=0.1)
  layer = _layer(model, seed=10)
  x = jax.random.normal(jax.random.key(11), (B, S, D))
  cot = jax.random.normal(jax.random.key(12), (B, S, D))
  gd, state = nnx.split(layer)

  @jax.jit
  def run(state, x):
    def loss(state):
      y, aux, metrics = nnx.merge(gd, state)(x)
      return jnp.sum(y * cot), (y, aux, metrics)
    return jax.value_and_grad(loss, has_aux=True)(state)

  (_, (y, aux, metrics)), grads = run(state, x)
  w = {n: f64(p) for n, p in layer.experts.w.items()}
  xs = np.asarray(x, np.float64).reshape(-1, D)
  idx, g, probs, margin = ref.route(xs @ f64(layer.router.gate), "topk", K)
  assert margin > 1e-4
  want = np.zeros_like(xs)
  for e in range(E):
    tok, slot = np.nonzero(idx == e)
    want[tok] += g[tok, slot, None] * _ffn(xs[tok], w, e, width=WIDTHS[e])
  _close(np.asarray(y).reshape(-1, D), want)
  gw = {n: np.asarray(v[...]) for n, v in grads["experts"]["w"].items()}
  for e, width in enumerate(WIDTHS):
    for n in ("gate", "up"):
      np.testing.assert_array_equal(gw[n][e][:, width:], 0.0)
      assert np.abs(gw[n][e][:, :width]).max() > 0
    np.testing.assert_array_equal(gw["down"][e][width:], 0.0)
  scale = np.asarray(WIDTHS) / np.mean(WIDTHS)
  pp = _switch(probs, idx, np.ones(len(xs), bool), scale)
  assert float(metrics["param_penalty"]) == pytest.approx(pp, rel=1e-5)
  assert float(metrics["active_width"]) == pytest.approx(np.asarray(WIDTHS)[idx].sum() / len(xs))
  np.testing.assert_allclose(float(aux), model.moe.lb_loss_weight * float(metrics["lb_loss"])
                             + model.moe.z_loss_weight * float(metrics["z_loss"]) + 0.1 * pp,
                             rtol=1e-5)


def test_heterogeneous_init_stores_zeros_in_the_padding():
  """`init_widths` zeroes each expert's padding and rescales its `down` to std F_e^-1/2."""
  bank = _fill(nnx.eval_shape(lambda: ExpertBank(E, D, max(WIDTHS), "swiglu",
                                                 rngs=nnx.Rngs(0))), seed=13)
  before = {n: f64(p) for n, p in bank.w.items()}
  heterogeneous.init_widths(bank, WIDTHS)
  for n, p in bank.w.items():
    v = f64(p)
    for e, width in enumerate(WIDTHS):
      if n == "down":
        np.testing.assert_array_equal(v[e][width:], 0.0)
        _close(v[e][:width], before[n][e][:width] * np.sqrt(max(WIDTHS) / width), rtol=1e-6)
      else:
        np.testing.assert_array_equal(v[e][:, width:], 0.0)
        np.testing.assert_array_equal(v[e][:, :width], before[n][e][:, :width])
  np.testing.assert_array_equal(heterogeneous.width_mask((1, 3)), [[1, 0, 0], [1, 1, 1]])


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("field, value", [
    ("null_experts", -1), ("null_experts", 1.5), ("extra_experts", ("zero", "half")),
    ("extra_experts", "zero"), ("zero_compute_lb_weight", -0.1), ("gating_residual", 1),
    ("chain_iterations", 0), ("expert_widths", (8, 16, 24)), ("expert_widths", (8, 16, 0, 8)),
    ("param_penalty_weight", -1.0)])
def test_bad_variant_fields_are_refused(field, value):
  c = load_config()
  # configs/default.py types its fields (a wrong type fails on the command line already);
  # a config written without them takes any value, which validate must refuse.
  del c.model.moe[field]
  c.model.moe[field] = value
  with pytest.raises(ConfigError, match=f"model.moe.{field}"):
    validate(c)


def test_variant_refusals_by_router():
  with pytest.raises(ConfigError, match="extra_experts"):
    validate(load_config(**{"model.moe.router": "thor", "model.moe.null_experts": 1}))


@pytest.mark.parametrize("name", ["moe_plus_plus", "adamoe", "chain_of_experts", "hmoe"])
def test_presets_validate(name):
  validate(load_config(name))
