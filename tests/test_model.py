"""Tests for moejax.model: causality, packed segments, grouped-query attention (against a float64
numpy attention with RoPE, and against multi-head attention with repeated K/V heads), the untied
head, dtypes, logical axis names and the MoE auxiliary outputs."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import validate
from moejax.model import Attention, Transformer

from helpers import load_config

B, S, V = 2, 12, 32


def _config(**overrides):
  """configs/default.py shrunk to a two-layer toy (layer 0 dense, layer 1 MoE), with dotted
  overrides relative to the root."""
  small = {"model.vocab_size": V, "model.d_model": 16, "model.num_layers": 2,
           "model.num_heads": 2, "model.num_kv_heads": 2, "model.head_dim": 8,
           "model.d_ff": 16, "model.max_len": 16, "model.moe_every": 2,
           "model.moe.num_experts": 4, "model.moe.top_k": 2, "model.moe.routing_group": S,
           "train.seq_len": S, "train.batch_size": B, "mesh.data": 1}
  return validate(load_config(**{**small, **overrides}))


def _build(cls, *args, seed):
  """cls(*args) with weights drawn in numpy at the model's init scales.

  The module is built abstractly (`nnx.eval_shape`) and then filled: building it eagerly would
  compile one random-number kernel per parameter shape, which costs more than the tests.
  """
  module = nnx.eval_shape(lambda: cls(*args, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  for _, p in nnx.iter_graph(module):
    if not isinstance(p, nnx.Param):
      continue
    names, shape = p.out_sharding, p.shape
    if len(shape) == 1:                                   # RMSNorm scale
      value = np.ones(shape)
    else:
      if names == ("vocab", "embed"):
        fan_in = 1
      elif names[0] == "embed" and len(shape) == 3:       # wq, wk, wv [D, H, Dh]
        fan_in = shape[0]
      elif names[0] == "heads":                           # wo [H, Dh, D]
        fan_in = shape[0] * shape[1]
      else:                                               # [.., in, out]
        fan_in = shape[-2]
      value = rng.standard_normal(shape) * fan_in ** -0.5
    p.set_value(jnp.asarray(value, p.dtype))
  return module


@functools.partial(jax.jit, static_argnums=(0, 5))
def _run(graphdef, state, inputs, positions, segment_ids, train=False, rng=None):
  model = nnx.merge(graphdef, state)
  return model(inputs, positions, segment_ids, train=train, rng=rng)


def _logits(model, inputs, positions=None, segment_ids=None):
  if positions is None:
    positions = np.broadcast_to(np.arange(inputs.shape[1]), inputs.shape)
  if segment_ids is None:
    segment_ids = np.ones(inputs.shape, np.int32)
  logits, aux = _run(*nnx.split(model), jnp.asarray(inputs, jnp.int32),
                     jnp.asarray(positions, jnp.int32), jnp.asarray(segment_ids, jnp.int32))
  return np.asarray(logits), aux


@pytest.fixture(scope="module")
def base():
  config = _config()
  return config, _build(Transformer, config.model, seed=0)


@pytest.fixture(scope="module")
def gqa():
  config = _config(**{"model.num_kv_heads": 1})
  return config, _build(Transformer, config.model, seed=1)


def _tokens(seed):
  return np.asarray(jax.random.randint(jax.random.key(seed), (B, S), 0, V))


def _assert_causal(model):
  inputs = _tokens(0)
  logits, _ = _logits(model, inputs)
  assert logits.shape == (B, S, V) and logits.dtype == np.float32
  for t in (0, 4, S - 2):
    changed = inputs.copy()
    changed[:, t + 1] = (changed[:, t + 1] + 1 + np.arange(B)) % V
    other, _ = _logits(model, changed)
    np.testing.assert_allclose(other[:, :t + 1], logits[:, :t + 1], rtol=1e-6, atol=1e-6)
    # ... and the change is seen from position t+1 on (the test can fail).
    assert np.abs(other[:, t + 1] - logits[:, t + 1]).max() > 1e-4


def test_model_is_causal(base):
  _assert_causal(base[1])


def test_grouped_query_attention_is_causal(gqa):
  _assert_causal(gqa[1])


def test_packed_segment_equals_running_it_alone(base):
  model = base[1]
  n1, n2 = 5, 7
  tokens = _tokens(1)
  seg1, seg2 = tokens[0, :n1], tokens[1, :n2]
  # Row 0: two packed documents. Row 1: document 2 alone at the start, then padding (segment 0).
  inputs = np.stack([np.concatenate([seg1, seg2]), np.concatenate([seg2, tokens[1, n2:]])])
  positions = np.stack([np.r_[np.arange(n1), np.arange(n2)], np.r_[np.arange(n2), np.arange(n1)]])
  segment_ids = np.stack([np.r_[[1] * n1, [2] * n2], np.r_[[1] * n2, [0] * n1]])
  logits, _ = _logits(model, inputs, positions, segment_ids)
  np.testing.assert_allclose(logits[0, n1:], logits[1, :n2], rtol=1e-5, atol=1e-5)
  # Without the segment ids the second document sees the first: different logits.
  unpacked, _ = _logits(model, inputs)
  assert np.abs(unpacked[0, n1:] - logits[0, n1:]).max() > 1e-3
  np.testing.assert_allclose(unpacked[0, :n1], logits[0, :n1], rtol=1e-5, atol=1e-5)


def test_rope_makes_attention_shift_invariant(base):
  inputs = _tokens(2)
  logits, _ = _logits(base[1], inputs)
  shifted, _ = _logits(base[1], inputs, positions=np.broadcast_to(np.arange(S) + 9, (B, S)))
  np.testing.assert_allclose(shifted, logits, rtol=1e-4, atol=1e-4)


def _copy_into_mha(gqa_model, mha_model, heads, kv_heads):
  """mha_model's parameters := gqa_model's, K/V heads repeated so head h reads K/V h // group."""
  def take(path, mha_leaf, gqa_leaf):
    names = [getattr(p, "key", getattr(p, "name", None)) for p in path]
    if "wk" in names or "wv" in names:
      return jnp.repeat(gqa_leaf, heads // kv_heads, axis=1)
    return gqa_leaf
  graphdef, mha_state = nnx.split(mha_model)
  new = jax.tree_util.tree_map_with_path(take, mha_state, nnx.state(gqa_model))
  return nnx.merge(graphdef, new)


def test_grouped_query_equals_multi_head_with_repeated_kv(base, gqa):
  config = _config()
  mha = _copy_into_mha(gqa[1], _build(Transformer, config.model, seed=0), 2, 1)
  inputs = _tokens(3)
  want, _ = _logits(gqa[1], inputs)
  got, _ = _logits(mha, inputs)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- attention oracle


def _np_rope(x, positions, theta):
  half = x.shape[-1] // 2
  freq = theta ** (-np.arange(half) / half)
  angle = positions[..., None, None] * freq              # [B, S, 1, half]
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                         x2 * np.cos(angle) + x1 * np.sin(angle)], axis=-1)


def _np_attention(x, wq, wk, wv, wo, positions, segment_ids, theta):
  """Causal, segment-masked, grouped-query softmax attention in float64, head by head."""
  q = _np_rope(np.einsum("bsd,dhk->bshk", x, wq), positions, theta)
  k = _np_rope(np.einsum("bsd,dhk->bshk", x, wk), positions, theta)
  v = np.einsum("bsd,dhk->bshk", x, wv)
  b, s, h, dh = q.shape
  group = h // k.shape[2]
  out = np.zeros_like(q)
  allowed = (np.tril(np.ones((s, s), bool))[None]
             & (segment_ids[:, :, None] == segment_ids[:, None, :]))
  for head in range(h):
    scores = np.einsum("bqk,bsk->bqs", q[:, :, head], k[:, :, head // group]) / np.sqrt(dh)
    scores = np.where(allowed, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out[:, :, head] = np.einsum("bqs,bsk->bqk", p, v[:, :, head // group])
  return np.einsum("bshk,hkd->bsd", out, wo)


def test_attention_matches_numpy_reference():
  m = _config(**{"model.num_heads": 4, "model.num_kv_heads": 2}).model
  attn = _build(Attention, m, seed=4)
  x = np.asarray(jax.random.normal(jax.random.key(5), (B, S, m.d_model)), np.float64)
  positions = np.stack([np.r_[np.arange(5), np.arange(7)], np.arange(S) + 3])
  segment_ids = np.stack([np.r_[[1] * 5, [2] * 7], np.ones(S, int)])
  graphdef, state = nnx.split(attn)
  got = jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args))(
      state, jnp.asarray(x, jnp.float32), jnp.asarray(positions), jnp.asarray(segment_ids))
  w = {n: np.asarray(getattr(attn, n)[...], np.float64) for n in ("wq", "wk", "wv", "wo")}
  want = _np_attention(x, w["wq"], w["wk"], w["wv"], w["wo"], positions, segment_ids,
                       m.rope_theta)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- head, aux, dtypes


def test_untied_head(base):
  config = _config(**{"model.tie_embeddings": False})
  untied = _build(Transformer, config.model, seed=0)
  nnx.update(untied, nnx.state(base[1]))                  # the same weights but the head
  assert base[1].head is None
  assert untied.head[...].shape == (16, V)
  assert untied.head.out_sharding == ("embed", "vocab")
  inputs = _tokens(6)
  logits_untied, _ = _logits(untied, inputs)
  assert np.isfinite(logits_untied).all()
  # The tied head is the embedding transposed, scaled by d_model^-1/2.
  untied.head[...] = base[1].embed[...].T * 16 ** -0.5
  tied_logits, _ = _logits(base[1], inputs)
  got, _ = _logits(untied, inputs)
  np.testing.assert_allclose(got, tied_logits, rtol=1e-5, atol=1e-5)
  assert np.abs(got - logits_untied).max() > 1e-3


def test_moe_aux(base):
  config, model = base
  _, aux = _logits(model, _tokens(7))
  assert set(aux.layers) == {"layer_1"}                   # moe_every=2: layer 0 is dense
  m = jax.tree.map(np.asarray, aux.layers["layer_1"])
  assert set(m) == {"load", "dropped_frac", "router_entropy", "max_vio", "lb_loss", "z_loss",
                    "experts_per_token"}
  assert m["load"].shape == (4,) and m["load"].sum() == pytest.approx(1.0)
  moe = config.model.moe
  assert float(aux.aux_loss) == pytest.approx(
      moe.lb_loss_weight * m["lb_loss"] + moe.z_loss_weight * m["z_loss"], rel=1e-6)


_LOGICAL_AXES = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "expert",
                 "expert_mlp"}


def test_parameters_carry_logical_axis_names(gqa):
  params = nnx.state(gqa[1], nnx.Param)
  leaves = jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, nnx.Variable))
  assert len(leaves) > 10
  for p in leaves:
    names = p.out_sharding
    assert len(names) == p[...].ndim and set(names) <= _LOGICAL_AXES, names


def test_bfloat16_switch_capacity_model():
  """A bfloat16 model with Switch routing (jitter on) and capacity dispatch: float32 logits, the
  key reaches the routers, and it stays causal - with top-1, GShard priority fills each expert
  in token order, so a later token can never take an earlier token's slot. (Top-k > 1 capacity
  routing is not causal: a later first choice outranks an earlier second choice.)"""
  config = _config(**{"model.dtype": "bfloat16", "model.moe.router": "switch",
                      "model.moe.top_k": 1, "model.moe.dispatch": "capacity",
                      "model.moe.capacity_factor": 1.0, "model.moe_every": 1})
  model = _build(Transformer, config.model, seed=8)
  graphdef, state = nnx.split(model)
  run = lambda inputs, key: _run(graphdef, state, jnp.asarray(inputs),
                                 jnp.broadcast_to(jnp.arange(S), (B, S)),
                                 jnp.ones((B, S), jnp.int32), True, jax.random.key(key))
  inputs = _tokens(8)
  logits, aux = run(inputs, 0)
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
  assert set(aux.layers) == {"layer_0", "layer_1"}
  dropped = [float(layer["dropped_frac"]) for layer in aux.layers.values()]
  assert all(0.0 <= d < 1.0 for d in dropped) and max(dropped) > 0
  # The key reaches the routers: another key, other jitter noise.
  _, other_aux = run(inputs, 1)
  assert float(jnp.abs(other_aux.layers["layer_0"]["z_loss"]
                       - aux.layers["layer_0"]["z_loss"])) > 0
  t = 5
  changed = inputs.copy()
  changed[:, t + 1] = (changed[:, t + 1] + 1) % V
  other, _ = run(changed, 0)
  np.testing.assert_array_equal(np.asarray(other)[:, :t + 1], np.asarray(logits)[:, :t + 1])
  assert np.abs(np.asarray(other)[:, t + 1] - np.asarray(logits)[:, t + 1]).max() > 1e-3
