"""Tests for the soft and retrieval MoE layers of moejax.moe.variants (soft, smear, mot, peer,
multi_head): each against a float64 numpy reference written from its paper, plus the property
that defines it (differentiability, merging linear in the weights, causality and batch
(in)dependence, exact product-key retrieval, sub-token routing).

One tiny config for all (D = 16, d_ff = 32, E = 4, top-2); each layer's forward and gradient
are compiled once and shared by its tests.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import validate, validate_model
from moejax.errors import ConfigError
from moejax.model import Transformer
from moejax.moe.variants import MOE_LAYERS
from moejax.moe.variants.multi_head import sub_token_config
from moejax.moe.variants.peer import product_key_top_k
from moejax.moe.variants.smear import merge_experts, smear_per_row, smear_per_token

import reference as ref
from helpers import load_config, set_fields

B, S, D, F, E = 4, 8, 16, 32, 4
PEER_N, PEER_HEADS, PEER_K = 2 ** 14, 4, 8


def _model(**moe):
  """configs/default.py's model, tiny, with `model.moe` overrides."""
  model = set_fields(load_config().model, {"d_model": D, "d_ff": F, "vocab_size": 32,
                                            "num_layers": 1, "num_heads": 2, "num_kv_heads": 2,
                                            "head_dim": 8, "moe.num_experts": E, "moe.top_k": 2})
  return set_fields(model, {f"moe.{k}": v for k, v in moe.items()})


CONFIGS = {
    "soft": _model(layer="soft", soft_slots_per_expert=2),
    "smear": _model(layer="smear"),
    "smear_sequence": _model(layer="smear", smear_routing="sequence"),
    "mot": _model(layer="mot", mot_group_size=4),
    "peer": _model(layer="peer", peer_experts=PEER_N, peer_heads=PEER_HEADS, peer_top_k=PEER_K),
    "multi_head": _model(layer="multi_head", mh_heads=2),
}


def _fill(layer, seed):
  """Every parameter of `layer` drawn in numpy (normal, std fan_in^-1/2 with fan_in =
  shape[-2]); building the layer abstractly and filling it compiles no random kernels."""
  rng = np.random.default_rng(seed)
  for _, p in nnx.iter_graph(layer):
    if isinstance(p, nnx.Param):
      scale = p.shape[-2] ** -0.5 if p.ndim > 1 else 1.0
      p.set_value(jnp.asarray(rng.standard_normal(p.shape) * scale, p.dtype))
  return layer


@functools.cache
def _layer(name):
  model = CONFIGS[name]
  return _fill(nnx.eval_shape(lambda: MOE_LAYERS[model.moe.layer](model, rngs=nnx.Rngs(0))), 1)


@functools.cache
def _compiled(name):
  """forward_and_grad(state, x, segment_ids, cot) -> (y, aux_loss, metrics, d sum(y * cot) /
  d state), jitted once per layer: one compile serves the forward and the gradient tests."""
  graphdef, _ = nnx.split(_layer(name))

  def loss(state, x, seg, cot):
    y, aux_loss, metrics, _ = nnx.merge(graphdef, state).forward(x, seg, carry={})
    return jnp.sum(y * cot), (y, aux_loss, metrics)

  def forward_and_grad(state, x, seg, cot):
    (_, (y, aux_loss, metrics)), grads = jax.value_and_grad(loss, has_aux=True)(state, x, seg,
                                                                                 cot)
    return y, aux_loss, metrics, grads
  return jax.jit(forward_and_grad)


def _run(name, x, seg, layer=None):
  """(y [B, S, D] float64, aux loss, metrics, grads {path: array} of sum(y * cot))."""
  cot = np.random.default_rng(9).standard_normal(x.shape).astype(np.float32)
  y, aux, metrics, grads = _compiled(name)(nnx.state(layer or _layer(name)), x, seg, cot)
  grads = {"/".join(map(str, path)): np.asarray(v[...]) for path, v in nnx.to_flat_state(grads)}
  return np.asarray(y, np.float64), float(aux), jax.tree.map(np.asarray, metrics), grads


def _inputs(seed=0, b=B):
  """x [b, S, D] and segment ids with a padded tail in row 1 and two documents in row 2."""
  x = np.random.default_rng(seed).standard_normal((b, S, D)).astype(np.float32)
  seg = np.ones((b, S), np.int32)
  seg[1, 6:] = 0
  seg[2, 3:] = 2
  return x, seg


def _w64(bank):
  return {n: np.asarray(p[...], np.float64) for n, p in bank.w.items()}


def _expert(w, e):
  return {n: v[e] for n, v in w.items()}


def _check_grads(name, x, seg, everywhere=True):
  """Gradients of sum(y * cot) for every parameter: finite, and nonzero (every entry when
  `everywhere`); returns them as {path: array}."""
  grads = _run(name, x, seg)[3]
  assert grads
  for path, v in grads.items():
    assert np.all(np.isfinite(v)), path
    assert np.any(v != 0), path
    if everywhere:
      assert np.all(v != 0), path
  return grads


def _common_metrics(metrics, experts):
  assert metrics["load"].shape == (experts,)
  np.testing.assert_allclose(metrics["load"].sum(), 1.0, rtol=1e-5)
  np.testing.assert_allclose(metrics["max_vio"], metrics["load"].max() * experts - 1, rtol=1e-4,
                             atol=1e-6)
  assert metrics["dropped_frac"] == 0.0


# ----------------------------------------------------------------------------- Soft MoE


def _soft_reference(x, seg, layer):
  """Soft MoE per row in float64 (arXiv:2308.00951, Algorithm 1) over the row's tokens."""
  phi = np.asarray(layer.phi[...], np.float64)
  _, e, p = phi.shape
  w = _w64(layer.experts)
  y = np.zeros(x.shape)
  for b in range(x.shape[0]):
    keep = seg[b] > 0
    xb = x[b, keep].astype(np.float64)
    logits = xb @ phi.reshape(D, e * p)
    dispatch = ref.softmax(logits.T).T                          # each slot: softmax over tokens
    combine = ref.softmax(logits)                               # each token: softmax over slots
    slots = dispatch.T @ xb                                     # [E P, D]
    outs = np.concatenate([ref.ffn(slots[i * p:(i + 1) * p], _expert(w, i), "swiglu")
                           for i in range(e)])
    y[b, keep] = combine @ outs
  return y


def test_soft_equals_reference_drops_nothing_and_reports_usage():
  x, seg = _inputs()
  y, aux, metrics, _ = _run("soft", x, seg)
  np.testing.assert_allclose(y, _soft_reference(x, seg, _layer("soft")), rtol=2e-5, atol=2e-6)
  assert aux == 0.0 and np.all(y[1, 6:] == 0)
  _common_metrics(metrics, E)
  # E * P slots per row, B rows, over the routed tokens.
  np.testing.assert_allclose(metrics["experts_per_token"], B * E * 2 / (seg > 0).sum())


def test_soft_is_fully_differentiable():
  x, seg = _inputs()
  _check_grads("soft", x, seg)


def test_soft_mixes_a_whole_row_but_no_other_row():
  """Permuting a row's tokens permutes its outputs (slots are sums over tokens); a later token
  changes an earlier token's output (not causal); another row changes nothing."""
  x, seg = _inputs()
  seg[:] = 1
  y, _, _, _ = _run("soft", x, seg)
  perm = np.random.default_rng(3).permutation(S)
  x2 = x.copy()
  x2[0] = x[0, perm]
  x2[1, -1] += 1.0
  y2, _, _, _ = _run("soft", x2, seg)
  np.testing.assert_allclose(y2[0], y[0, perm], rtol=1e-5, atol=1e-6)
  assert np.abs(y2[1, 0] - y[1, 0]).max() > 1e-4
  np.testing.assert_array_equal(y2[2:], y[2:])


# ----------------------------------------------------------------------------- SMEAR


def test_smear_merging_is_linear_and_one_hot_weights_give_that_expert():
  layer = _layer("smear")
  w = {n: p[...] for n, p in layer.experts.w.items()}
  w64 = _w64(layer.experts)
  rng = np.random.default_rng(4)
  p1, p2 = (ref.softmax(rng.standard_normal((3, E))) for _ in range(2))
  merged = lambda p: {n: np.asarray(v) for n, v in merge_experts(jnp.asarray(p), w).items()}
  m1, m2, m12 = merged(p1), merged(p2), merged(0.3 * p1 + 0.7 * p2)
  for n in w:
    np.testing.assert_allclose(m12[n], 0.3 * m1[n] + 0.7 * m2[n], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m1[n], np.einsum("ne,e...->n...", p1, w64[n]), rtol=1e-5,
                               atol=1e-6)
  x = rng.standard_normal((E, S, D)).astype(np.float32)
  onehot = np.eye(E, dtype=np.float32)                           # row b takes expert b
  per_row = np.asarray(smear_per_row(jnp.asarray(x), jnp.asarray(onehot), w, "swiglu",
                                     jnp.float32))
  per_token = np.asarray(smear_per_token(jnp.asarray(x.reshape(E * S, D)),
                                         jnp.asarray(np.repeat(onehot, S, axis=0)), w,
                                         "swiglu", jnp.float32)).reshape(E, S, D)
  for e in range(E):
    expert = ref.ffn(x[e].astype(np.float64), _expert(w64, e), "swiglu")
    np.testing.assert_allclose(per_row[e], expert, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(per_token[e], expert, rtol=1e-4, atol=1e-5)


def _smear_reference(x, seg, layer, routing):
  """SMEAR in float64 with an explicitly merged expert per token (prefix: the mean of the
  token's document so far; sequence: of the whole row)."""
  gate = np.asarray(layer.gate[...], np.float64)
  w = _w64(layer.experts)
  y = np.zeros(x.shape)
  for b in range(x.shape[0]):
    for s in np.nonzero(seg[b] > 0)[0]:
      same = seg[b] == seg[b, s]
      if routing == "prefix":
        rows = same & (np.arange(S) <= s)
      else:
        rows = seg[b] > 0
      p = ref.softmax(x[b, rows].astype(np.float64).mean(0) @ gate)
      merged = {n: np.einsum("e,e...->...", p, v) for n, v in w.items()}
      y[b, s] = ref.ffn(x[b, s:s + 1].astype(np.float64), merged, "swiglu")[0]
  return y


@pytest.mark.parametrize("name,routing", [("smear", "prefix"), ("smear_sequence", "sequence")])
def test_smear_equals_reference(name, routing):
  x, seg = _inputs()
  y, aux, metrics, _ = _run(name, x, seg)
  np.testing.assert_allclose(y[seg > 0], _smear_reference(x, seg, _layer(name), routing)[seg > 0],
                             rtol=1e-4, atol=1e-5)
  assert aux == 0.0 and metrics["experts_per_token"] == (E if routing == "prefix" else 1.0)
  _common_metrics(metrics, E)


def test_smear_prefix_routing_is_causal_and_differentiable():
  x, seg = _inputs()
  y, _, _, _ = _run("smear", x, seg)
  x2 = x.copy()
  x2[:, 5:] += 1.0
  y2, _, _, _ = _run("smear", x2, seg)
  np.testing.assert_array_equal(y2[:, :5], y[:, :5])
  assert np.abs(y2[0, 5:] - y[0, 5:]).max() > 1e-4
  _check_grads("smear", x, seg)


# ----------------------------------------------------------------------------- Mixture of Tokens


def _mot_reference(x, seg, layer, n):
  """Mixture of Tokens in float64 (arXiv:2310.15961): per group of n rows and position."""
  gate = np.asarray(layer.gate[...], np.float64)
  w = _w64(layer.experts)
  y = np.zeros(x.shape)
  for g0 in range(0, x.shape[0], n):
    for s in range(S):
      rows = [r for r in range(g0, min(g0 + n, x.shape[0])) if seg[r, s] > 0]
      if not rows:
        continue
      xs = x[rows, s].astype(np.float64)                           # [m, D]
      weights = ref.softmax((xs @ gate).T).T                       # [m, E]: over the group
      for e in range(E):
        out = ref.ffn(weights[:, e] @ xs[None], _expert(w, e), "swiglu")[0]
        y[rows, s] += weights[:, e, None] * out
  return y


def test_mot_equals_reference_with_a_padded_group():
  # 6 rows in groups of 4: the second group is padded with two empty rows.
  x, seg = _inputs(b=6)
  y, aux, metrics, _ = _run("mot", x, seg)
  np.testing.assert_allclose(y, _mot_reference(x, seg, _layer("mot"), 4), rtol=2e-5, atol=2e-6)
  assert aux == 0.0
  _common_metrics(metrics, E)
  assert metrics["max_vio"] == 0.0
  # Each expert runs once per group position holding a token: 2 groups x 8 positions.
  np.testing.assert_allclose(metrics["experts_per_token"], 2 * S * E / (seg > 0).sum())


def test_mot_is_causal_mixes_its_group_only_and_is_differentiable():
  x, seg = _inputs(b=6)
  y, _, _, _ = _run("mot", x, seg)
  x2 = x.copy()
  x2[1, 4:] += 1.0                        # row 1: group 0, from position 4 on
  y2, _, _, _ = _run("mot", x2, seg)
  np.testing.assert_array_equal(y2[:, :4], y[:, :4])        # causal
  assert np.abs(y2[0, 4:] - y[0, 4:]).max() > 1e-4          # batch-dependent within a group
  np.testing.assert_array_equal(y2[4:], y[4:])              # not across groups
  _check_grads("mot", x, seg)


# ----------------------------------------------------------------------------- PEER


def test_product_key_top_k_equals_brute_force_over_all_keys():
  rng = np.random.default_rng(5)
  t, h, dq, k, n = 16, 4, 16, 8, 128
  q = rng.standard_normal((t, h, dq)).astype(np.float32)
  sub = rng.standard_normal((2, n, dq // 2)).astype(np.float32)
  scores, index = jax.jit(product_key_top_k, static_argnums=2)(q, sub, k)
  # All N = n^2 = 16384 keys k_(a,b) = [c_a, c'_b] in float64.
  keys = np.concatenate([np.repeat(sub[0], n, axis=0), np.tile(sub[1], (n, 1))], axis=1)
  full = np.einsum("thc,nc->thn", q.astype(np.float64), keys.astype(np.float64))
  best = np.argsort(-full, axis=-1, kind="stable")[..., :k]
  np.testing.assert_array_equal(np.asarray(index), best)
  np.testing.assert_allclose(np.asarray(scores), np.take_along_axis(full, best, -1), rtol=1e-5,
                             atol=1e-5)


def _peer_reference(x, seg, layer):
  """PEER in float64 (arXiv:2407.04153) with brute-force retrieval over all N keys."""
  f64 = lambda p: np.asarray(p[...], np.float64)
  wq, sub, u, v = f64(layer.query), f64(layer.sub_keys), f64(layer.down), f64(layer.up)
  n = sub.shape[1]
  keys = np.concatenate([np.repeat(sub[0], n, axis=0), np.tile(sub[1], (n, 1))], axis=1)
  y = np.zeros(x.shape)
  for b, s in zip(*np.nonzero(seg > 0)):
    xt = x[b, s].astype(np.float64)
    for q in np.einsum("d,dhc->hc", xt, wq):
      score = keys @ q
      top = np.argsort(-score, kind="stable")[:PEER_K]
      g = ref.softmax(score[top])
      y[b, s] += (g * ref.gelu(u[top] @ xt)) @ v[top]
  return y


def test_peer_with_16k_experts_equals_reference_and_reports_usage():
  x, seg = _inputs()
  y, aux, metrics, _ = _run("peer", x, seg)
  np.testing.assert_allclose(y, _peer_reference(x, seg, _layer("peer")), rtol=1e-4, atol=1e-5)
  assert aux == 0.0
  n = int(np.sqrt(PEER_N))
  assert metrics["load"].shape == (n,) and metrics["dropped_frac"] == 0.0
  np.testing.assert_allclose(metrics["load"].sum(), 1.0, rtol=1e-5)
  assert metrics["experts_per_token"] == PEER_HEADS * PEER_K
  retrieved = (seg > 0).sum() * PEER_HEADS * PEER_K
  assert 0 < metrics["expert_usage"] * PEER_N <= retrieved


def test_peer_gradients_reach_exactly_the_retrieved_experts():
  x, seg = _inputs()
  grads = _check_grads("peer", x, seg, everywhere=False)
  layer = _layer("peer")
  f64 = lambda p: np.asarray(p[...], np.float64)
  sub, n = f64(layer.sub_keys), int(np.sqrt(PEER_N))
  keys = np.concatenate([np.repeat(sub[0], n, axis=0), np.tile(sub[1], (n, 1))], axis=1)
  q = np.einsum("td,dhc->thc", x[seg > 0].astype(np.float64), f64(layer.query))
  retrieved = np.zeros(PEER_N, bool)
  retrieved[np.argsort(-(q @ keys.T), axis=-1, kind="stable")[..., :PEER_K].reshape(-1)] = True
  for name in ("down", "up"):
    np.testing.assert_array_equal(np.any(grads[name] != 0, axis=1), retrieved)


# ----------------------------------------------------------------------------- MH-MoE


def _mh_reference(x, seg, layer):
  """MH-MoE in float64 (arXiv:2404.15045): project, split into 2 sub-tokens, route each top-2
  of E (softmax, the top-2 probabilities as weights), SwiGLU experts, merge, project. Returns
  (y [B, S, D], each expert's share of the routed sub-token copies [E])."""
  f64 = lambda p: np.asarray(p[...], np.float64)
  gate, w = f64(layer.inner.router.gate), _w64(layer.inner.experts)
  sub = (x.astype(np.float64) @ f64(layer.head)).reshape(-1, D // 2)
  keep = np.repeat(seg.reshape(-1) > 0, 2)
  idx, weights, _, margin = ref.route(sub @ gate, "topk", 2)
  assert margin > 1e-6
  out = np.zeros_like(sub)
  for t in np.nonzero(keep)[0]:
    for e, g in zip(idx[t], weights[t]):
      out[t] += g * ref.ffn(sub[t:t + 1], _expert(w, e), "swiglu")[0]
  load = np.bincount(idx[keep].reshape(-1), minlength=E) / idx[keep].size
  return out.reshape(x.shape) @ f64(layer.merge), load


def test_mh_moe_equals_reference_and_with_identity_projections_routes_reshaped_tokens():
  """Against the float64 reference with random projections, then with W_head = W_merge = I,
  where MH-MoE is the sparse layer run on the [B S h, D/h] reshape of the tokens (the
  reference routes exactly that reshape)."""
  x, seg = _inputs()
  model = CONFIGS["multi_head"]
  identity = _fill(nnx.eval_shape(lambda: MOE_LAYERS["multi_head"](model, rngs=nnx.Rngs(0))), 1)
  identity.head.set_value(jnp.eye(D, dtype=jnp.float32))
  identity.merge.set_value(jnp.eye(D, dtype=jnp.float32))
  for layer in (_layer("multi_head"), identity):
    y, aux, metrics, _ = _run("multi_head", x, seg, layer)
    y_ref, load = _mh_reference(x, seg, layer)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(metrics["load"], load, rtol=1e-6)
    assert aux > 0 and metrics["experts_per_token"] == 2.0
  assert sub_token_config(model, 2).d_model == D // 2 and model.d_model == D


def test_mh_moe_parameter_count():
  params = sum(p.size for _, p in nnx.to_flat_state(nnx.state(_layer("multi_head"), nnx.Param)))
  # W_head, W_merge [D, D]; router [D/h, E]; E SwiGLU experts of 3 (D/h) F weights.
  assert params == 2 * D * D + (D // 2) * E + E * 3 * (D // 2) * F


# ----------------------------------------------------------------------------- the model


def test_every_layer_fits_the_model_and_logs_the_common_metrics():
  """Traced (not compiled) in a one-layer Transformer: the trainer's metrics are there."""
  for name, model in CONFIGS.items():
    validate_model(model)
    abstract = nnx.eval_shape(lambda m=model: Transformer(m, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    ids = jax.ShapeDtypeStruct((B, S), jnp.int32)
    logits, aux = jax.eval_shape(lambda s, i: nnx.merge(graphdef, s)(i, train=True), state, ids)
    metrics = aux.layers["layer_0"]
    assert logits.shape == (B, S, 32), name
    for key in ("load", "max_vio", "experts_per_token", "dropped_frac"):
      assert key in metrics, (name, key)


@pytest.mark.parametrize("layer,field,value", [
    ("soft", "soft_slots_per_expert", 0), ("smear", "smear_routing", "row"),
    ("mot", "mot_group_size", 0), ("peer", "peer_experts", 1000),
    ("peer", "peer_top_k", 200), ("multi_head", "mh_heads", 3), ("soft", "router", "switch"),
    ("mot", "dispatch", "capacity"), ("smear", "chain_iterations", 2)])
def test_bad_fields_are_refused_by_name(layer, field, value):
  model = _model(layer=layer, **{field: value})
  with pytest.raises(ConfigError) as err:
    validate_model(model)
  assert err.value.field == f"model.moe.{field}"


def test_mixture_of_tokens_needs_independent_rows(tmp_path):
  """The text source continues a document in the next row, which mot would mix into the same
  position: refused, naming data.source; the synthetic source validates."""
  validate(load_config("mixture_of_tokens"))
  (tmp_path / "a.txt").write_text("some text " * 50)
  with pytest.raises(ConfigError, match=r"data\.source.*'text'.*mot"):
    validate(load_config("mixture_of_tokens", **{"data.source": "text",
                                                 "data.text_glob": str(tmp_path / "*.txt")}))
