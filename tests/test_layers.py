"""Tests for moejax.moe.MoELayer against an independent oracle: a per-expert Python loop in
float64 numpy over the layer's own weights, for both dispatch modes, outputs and gradients.

The oracle's gradients are central finite differences of its float64 loss (the routing decision
is piecewise constant, so away from ties the differences see only the smooth paths: the combine
weights through the router gate, and the expert and shared FFNs).
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.moe import GMM_BACKENDS, MLP, MoELayer, moe_dims

import reference as ref
from helpers import load_config, set_fields

def _config(**overrides):
  """configs/default.py's `model` subtree with dotted overrides relative to it."""
  return set_fields(load_config().model, overrides)


def _layer_config(*, d_model, d_ff, experts, top_k, granularity=1, shared=0, expert_type="swiglu",
                  router="topk", router_args=None, dispatch="dropless", capacity_factor=1.0,
                  group_size=8, dtype="float32"):
  model = _config(d_model=d_model, d_ff=d_ff, dtype=dtype, param_dtype=dtype, **{
      "moe.num_experts": experts, "moe.top_k": top_k, "moe.granularity": granularity,
      "moe.num_shared_experts": shared, "moe.expert_type": expert_type, "moe.router": router,
      "moe.dispatch": dispatch, "moe.capacity_factor": capacity_factor,
      "moe.routing_group": group_size})
  for key, value in (router_args or {}).items():
    model.moe.router_args[key] = value
  return model


def _layer(model, seed):
  """MoELayer(model) with weights drawn in numpy (std fan_in^-1/2, fan_in = shape[-2]).

  The layer is built abstractly (`nnx.eval_shape`) and then filled: building it eagerly would
  compile one random-number kernel per parameter shape, which costs more than the tests.
  """
  layer = nnx.eval_shape(lambda: MoELayer(model, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  for _, p in nnx.iter_graph(layer):
    if isinstance(p, nnx.Param):
      p.set_value(jnp.asarray(rng.standard_normal(p.shape) * p.shape[-2] ** -0.5, p.dtype))
  return layer


# ----------------------------------------------------------------------------- numpy oracle


class Oracle:
  """The MoE layer as a per-expert loop in float64 over weights read from `layer`."""

  def __init__(self, layer, model):
    f64 = lambda p: np.asarray(p[...], np.float64)
    self.gate = f64(layer.router.gate)
    self.experts = {n: f64(p) for n, p in layer.experts.w.items()}
    self.shared = None if layer.shared is None else {n: f64(p) for n, p in layer.shared.w.items()}
    dims = moe_dims(model)
    self.num_experts, self.top_k = dims.experts, dims.experts_per_token
    self.kind, self.router = model.moe.expert_type, model.moe.router
    self.router_args = model.moe.router_args.to_dict()

  def params(self):
    p = {"gate": self.gate, **{f"experts.{n}": w for n, w in self.experts.items()}}
    if self.shared is not None:
      p.update({f"shared.{n}": w for n, w in self.shared.items()})
    return p

  def __call__(self, x, params=None, keep=None):
    """x [T, D] -> (y [T, D], expert_index [T, K], combine_weights [T, K], margin)."""
    p = params or self.params()
    idx, weights, _, margin = ref.route(x @ p["gate"], self.router, self.top_k, self.router_args)
    if keep is None:
      keep = np.ones(idx.shape, bool)
    y = np.zeros_like(x)
    for e in range(self.num_experts):
      tokens, slots = np.nonzero((idx == e) & keep)
      if tokens.size:
        w = {n: p[f"experts.{n}"][e] for n in self.experts}
        y[tokens] += weights[tokens, slots, None] * ref.ffn(x[tokens], w, self.kind)
    if self.shared is not None:
      y = y + ref.ffn(x, {n: p[f"shared.{n}"] for n in self.shared}, self.kind)
    return y, idx, weights, margin

  def grads(self, x, cot, eps=1e-6):
    """Central finite differences of sum(y * cot) w.r.t. x and every weight."""
    def fd(loss, a):
      g = np.zeros_like(a)
      for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + eps
        up = loss()
        a[i] = old - eps
        down = loss()
        a[i] = old
        g[i] = (up - down) / (2 * eps)
      return g
    x = x.copy()
    p = {n: w.copy() for n, w in self.params().items()}
    full = lambda: np.sum(self(x, p)[0] * cot)
    grads = {"x": fd(full, x), "gate": fd(full, p["gate"])}
    if self.shared is not None:
      for n in self.shared:
        grads[f"shared.{n}"] = fd(full, p[f"shared.{n}"])
    # Expert weights do not move the routing: difference each expert's own term only.
    idx, weights, _, _ = ref.route(x @ p["gate"], self.router, self.top_k, self.router_args)
    for n in self.experts:
      grads[f"experts.{n}"] = np.zeros_like(p[f"experts.{n}"])
    for e in range(self.num_experts):
      tokens, slots = np.nonzero(idx == e)
      if not tokens.size:
        continue
      w = {n: p[f"experts.{n}"][e].copy() for n in self.experts}
      term = lambda: np.sum(weights[tokens, slots, None] * ref.ffn(x[tokens], w, self.kind)
                            * cot[tokens])
      for n in self.experts:
        grads[f"experts.{n}"][e] = fd(term, w[n])
    return grads


# ----------------------------------------------------------------------------- jitted layer


def _set_mode(layer, dispatch, backend=None):
  """Switches `layer` (in place) to `dispatch` and, if given, grouped-matmul `backend`."""
  layer.plan = dataclasses.replace(layer.plan, dispatch=dispatch)
  if backend:
    layer.experts.ffn = dataclasses.replace(layer.experts.ffn, gmm_backend=backend)


def _both_dispatch(layer):
  """(graphdef dropless, graphdef capacity, state): the same weights under both dispatch modes."""
  old = layer.plan.dispatch
  _set_mode(layer, "capacity")
  gd_capacity, _ = nnx.split(layer)
  _set_mode(layer, "dropless")
  gd_dropless, state = nnx.split(layer)
  _set_mode(layer, old)
  return gd_dropless, gd_capacity, state


# The modes the oracle tests run: "dropless" (the default gmm backend, ragged_dot), "capacity",
# and "dropless/<backend>" for every other grouped-matmul backend.
MODES = ("dropless", "capacity") + tuple(
    f"dropless/{b}" for b in GMM_BACKENDS if b != "ragged_dot")


def _mode_graphdefs(layer):
  """(((mode, graphdef), ...), state): the same weights under every mode of MODES."""
  old = layer.plan.dispatch, layer.experts.ffn.gmm_backend
  graphdefs = []
  for mode in MODES:
    dispatch, _, backend = mode.partition("/")
    _set_mode(layer, dispatch, backend or "ragged_dot")
    graphdefs.append((mode, nnx.split(layer)[0]))
  _set_mode(layer, *old)
  return tuple(graphdefs), nnx.split(layer)[1]


@functools.partial(jax.jit, static_argnums=0)
def _forward_and_grads(graphdefs, state, x, cot):
  """x [B, S, D] -> per mode: y, aux_loss, metrics, routing, grads of sum(y * cot)."""
  def loss(state, x, gd):
    y, aux_loss, metrics = nnx.merge(gd, state)(x)
    return jnp.sum(y * cot), (y, aux_loss, metrics)
  out = {}
  for name, gd in graphdefs:
    (_, (y, aux, metrics)), (g_state, g_x) = jax.value_and_grad(
        loss, argnums=(0, 1), has_aux=True)(state, x, gd)
    routing = nnx.merge(gd, state).route(x.reshape(-1, x.shape[-1]))
    out[name] = dict(y=y, aux_loss=aux, metrics=metrics, routing=routing, g_state=g_state,
                     g_x=g_x)
  return out


def _grad_dict(g_state, has_shared):
  g = {"gate": g_state["router"]["gate"][...]}
  g.update({f"experts.{n}": v[...] for n, v in g_state["experts"]["w"].items()})
  if has_shared:
    g.update({f"shared.{n}": v[...] for n, v in g_state["shared"]["w"].items()})
  return {n: np.asarray(v) for n, v in g.items()}


# (name, B, S, layer config); capacity mode gets group_size = S and a factor with room for all.
ORACLE_CASES = [
    ("swiglu_top2", 2, 8, dict(d_model=8, d_ff=8, experts=4, top_k=2)),
    ("gelu_switch_empty_experts", 1, 4, dict(d_model=8, d_ff=8, experts=8, top_k=1,
                                              expert_type="gelu", router="switch")),
    ("swiglu_granularity2_shared_after", 2, 6, dict(
        d_model=8, d_ff=8, experts=2, top_k=1, granularity=2, shared=1,
        router_args=dict(softmax_order="after"))),
    ("gelu_sigmoid_2shared", 2, 5, dict(d_model=6, d_ff=12, experts=3, top_k=2, shared=2,
                                        expert_type="gelu", router="sigmoid")),
    ("swiglu_granularity4_renorm_empty", 1, 3, dict(
        d_model=8, d_ff=16, experts=4, top_k=1, granularity=4,
        router_args=dict(renormalize=True))),
]


@pytest.fixture(scope="module", params=ORACLE_CASES, ids=[c[0] for c in ORACLE_CASES])
def oracle_case(request):
  name, b, s, kwargs = request.param
  seed = ORACLE_CASES.index(request.param)
  model = _layer_config(group_size=s, **kwargs)
  dims = moe_dims(model)
  model.moe.capacity_factor = float(dims.experts)   # capacity >= every copy of a group
  layer = _layer(model, seed)
  oracle = Oracle(layer, model)
  x = np.asarray(jax.random.normal(jax.random.key(100 + seed), (b, s, model.d_model)))
  cot = np.asarray(jax.random.normal(jax.random.key(200 + seed), (b, s, model.d_model)))
  out = _forward_and_grads(*_mode_graphdefs(layer), jnp.asarray(x), jnp.asarray(cot))
  out = jax.tree.map(np.asarray, out)
  x2, cot2 = x.reshape(-1, model.d_model).astype(np.float64), cot.reshape(-1, model.d_model)
  y, idx, weights, margin = oracle(x2)
  assert margin > 1e-4, f"{name}: a near-tie in the routing makes the oracle ambiguous"
  return dict(name=name, model=model, dims=dims, layer=layer, x=x2, out=out, y=y, idx=idx,
              weights=weights, grads=oracle.grads(x2, cot2.astype(np.float64)), b=b, s=s)


def _close(got, want, rtol=1e-4, atol=1e-5):
  np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("dispatch", MODES)
def test_layer_matches_oracle_forward(oracle_case, dispatch):
  c = oracle_case
  out = c["out"][dispatch]
  np.testing.assert_array_equal(out["routing"].expert_index, c["idx"])
  _close(out["routing"].combine_weights, c["weights"], rtol=1e-5)
  _close(out["y"].reshape(c["x"].shape), c["y"])
  assert float(out["metrics"]["dropped_frac"]) == 0.0


@pytest.mark.parametrize("dispatch", MODES)
def test_layer_matches_oracle_gradients(oracle_case, dispatch):
  c = oracle_case
  out = c["out"][dispatch]
  _close(out["g_x"].reshape(c["x"].shape), c["grads"]["x"])
  got = _grad_dict(out["g_state"], c["layer"].shared is not None)
  assert set(got) == set(c["grads"]) - {"x"}
  for name, want in c["grads"].items():
    if name != "x":
      _close(got[name], want, atol=2e-5)


@pytest.mark.parametrize("mode", [m for m in MODES if m != "dropless"])
def test_capacity_with_room_for_all_equals_dropless(oracle_case, mode):
  out = oracle_case["out"]
  np.testing.assert_allclose(out[mode]["y"], out["dropless"]["y"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[mode]["g_x"], out["dropless"]["g_x"], rtol=1e-4, atol=1e-6)


def test_empty_experts_get_zero_gradient(oracle_case):
  c = oracle_case
  empty = np.setdiff1d(np.arange(c["dims"].experts), c["idx"])
  if c["name"].endswith("empty_experts") or c["name"].endswith("empty"):
    assert empty.size > 0, "the case was meant to leave experts without tokens"
  for dispatch in MODES:
    out = c["out"][dispatch]
    np.testing.assert_array_equal(out["routing"].group_sizes[empty], 0)
    for name, g in _grad_dict(out["g_state"], False).items():
      if name.startswith("experts."):
        np.testing.assert_array_equal(g[empty], 0.0)


def test_group_sizes_and_metrics(oracle_case):
  c = oracle_case
  out = c["out"]["dropless"]
  t, k, e = c["x"].shape[0], c["dims"].experts_per_token, c["dims"].experts
  sizes = out["routing"].group_sizes
  assert sizes.sum() == t * k
  np.testing.assert_array_equal(sizes, np.bincount(c["idx"].ravel(), minlength=e))
  m = out["metrics"]
  assert set(m) == {"load", "dropped_frac", "router_entropy", "max_vio", "lb_loss", "z_loss",
                    "experts_per_token"}
  np.testing.assert_allclose(m["load"], sizes / (t * k), rtol=1e-6)
  np.testing.assert_allclose(m["experts_per_token"], k, rtol=1e-6)   # dropless: all K
  moe = c["model"].moe
  np.testing.assert_allclose(out["aux_loss"], moe.lb_loss_weight * m["lb_loss"]
                             + moe.z_loss_weight * m["z_loss"], rtol=1e-6)


# ----------------------------------------------------------------------------- capacity drops


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x):
  layer = nnx.merge(graphdef, state)
  y, _, metrics = layer(x)
  return y, metrics, layer.route(x.reshape(-1, x.shape[-1]))


@pytest.mark.parametrize("factor, capacity, seed", [(0.5, 1, 11), (1.0, 2, 14)])
def test_small_capacity_drops_exactly_the_overflow(factor, capacity, seed):
  b, s, group = 2, 8, 4              # 4 groups of 4 tokens
  experts, k = 4, 2                  # capacity ceil(factor * 4 * 2 / 4) per expert per group
  model = _layer_config(d_model=8, d_ff=8, experts=experts, top_k=k, dispatch="capacity",
                        capacity_factor=factor, group_size=group)
  layer = _layer(model, seed)
  # Skew the gate so experts 0 and 1 are popular and copies overflow.
  layer.router.gate[...] = layer.router.gate[...] + jnp.array([1.0, 0.6, 0.0, 0.0])
  x = np.asarray(jax.random.normal(jax.random.key(8), (b, s, 8))) + 0.5
  y, metrics, routing = _forward(*nnx.split(layer), jnp.asarray(x))
  assert capacity == math.ceil(factor * group * k / experts)
  oracle = Oracle(layer, model)
  x2 = x.reshape(-1, 8).astype(np.float64)
  _, idx, _, margin = oracle(x2)
  assert margin > 1e-4
  np.testing.assert_array_equal(routing.expert_index, idx)
  keep = ref.capacity_keep(idx, experts, group, capacity)
  want, *_ = oracle(x2, keep=keep)
  _close(np.asarray(y).reshape(x2.shape), want)
  dropped = int((~keep).sum())
  assert 0 < dropped < idx.size
  assert float(metrics["dropped_frac"]) == pytest.approx(dropped / idx.size, abs=1e-7)
  # Experts that computed each token, after the drops: kept copies over tokens.
  assert float(metrics["experts_per_token"]) == pytest.approx(keep.sum() / b / s, rel=1e-6)
  # A token whose copies are all dropped keeps only its residual: the layer adds exactly zero.
  gone = ~keep.any(axis=1)
  assert gone.any()
  np.testing.assert_array_equal(np.asarray(y).reshape(x2.shape)[gone], 0.0)
  # group_sizes count routed copies, before drops.
  assert int(routing.group_sizes.sum()) == idx.size


# ----------------------------------------------------------------------------- conservation


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _single_expert(gd_dropless, gd_capacity, gd_mlp, state, mlp_state, x):
  y_d, _, _ = nnx.merge(gd_dropless, state)(x)
  y_c, _, m_c = nnx.merge(gd_capacity, state)(x)
  routing = nnx.merge(gd_dropless, state).route(x.reshape(-1, x.shape[-1]))
  return y_d, y_c, m_c, routing, nnx.merge(gd_mlp, mlp_state)(x)


def test_one_expert_top1_equals_dense_ffn():
  model = _layer_config(d_model=8, d_ff=16, experts=1, top_k=1, capacity_factor=1.0,
                        group_size=8)
  layer = _layer(model, 3)
  mlp = nnx.eval_shape(lambda: MLP(8, 16, "swiglu", rngs=nnx.Rngs(4)))
  for n, p in layer.experts.w.items():
    mlp.w[n].set_value(p[...][0])
  x = jax.random.normal(jax.random.key(5), (2, 8, 8))
  y_d, y_c, m_c, routing, y_mlp = _single_expert(*_both_dispatch(layer)[:2], nnx.split(mlp)[0],
                                                 nnx.split(layer)[1], nnx.split(mlp)[1], x)
  np.testing.assert_array_equal(routing.combine_weights, 1.0)
  np.testing.assert_array_equal(routing.expert_index, 0)
  assert float(m_c["dropped_frac"]) == 0.0
  w = {n: np.asarray(p[...][0], np.float64) for n, p in layer.experts.w.items()}
  want = ref.ffn(np.asarray(x, np.float64), w, "swiglu")
  for got in (y_d, y_c, y_mlp):
    _close(np.asarray(got), want, rtol=1e-5)
  np.testing.assert_allclose(y_d, y_mlp, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(y_c, y_mlp, rtol=1e-5, atol=1e-6)


def test_router_is_float32_in_a_bfloat16_layer():
  model = _layer_config(d_model=8, d_ff=8, experts=4, top_k=2, dtype="bfloat16")
  layer = _layer(model, 9)
  assert layer.router.gate[...].dtype == jnp.bfloat16
  x = jax.random.normal(jax.random.key(10), (1, 8, 8), jnp.bfloat16)
  y, metrics, routing = _forward(*nnx.split(layer), x)
  assert y.dtype == jnp.bfloat16
  for leaf in (routing.combine_weights, routing.router_probs, metrics["lb_loss"],
               metrics["z_loss"], metrics["router_entropy"]):
    assert leaf.dtype == jnp.float32
  oracle = Oracle(layer, model)
  x2 = np.asarray(x, np.float64).reshape(-1, 8)
  want, idx, weights, margin = oracle(x2)
  if margin > 1e-3:
    np.testing.assert_array_equal(routing.expert_index, idx)
  logits = x2 @ oracle.gate
  np.testing.assert_allclose(routing.router_probs, ref.softmax(logits), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(y, np.float32).reshape(x2.shape), want, rtol=5e-2,
                             atol=5e-2 * np.abs(want).max())
