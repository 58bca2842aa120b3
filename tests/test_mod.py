"""Tests for Mixture-of-Depths blocks (moejax.moe.depth, moejax.model.Block; arXiv:2404.02258):
the top-k choice against a float64 numpy ranking, skipped tokens bit-identical, chosen tokens
equal to the plain block run on the chosen tokens alone times the router weight (eq. 1), padding
and packed segments, the router's gradient against its closed form, the sec. 3.5 predictor loss
against a numpy BCE, the routing state over depth, config checks and the plain model unchanged.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import validate, validate_model
from moejax.errors import ConfigError
from moejax.model import Block, Transformer
from moejax.moe import depth

from helpers import load_config

B, S, D, V = 3, 16, 16, 32
CAPACITY = 0.25
K = 4                                   # round(0.25 * 16)


def _config(**overrides):
  """configs/mod.py shrunk: two blocks, both routed (mod_every 1), block 1 with an MoE FFN."""
  small = {"model.vocab_size": V, "model.d_model": D, "model.num_layers": 2,
           "model.num_heads": 2, "model.num_kv_heads": 2, "model.head_dim": 8,
           "model.d_ff": 16, "model.max_len": S, "model.moe_every": 2,
           "model.moe.num_experts": 4, "model.moe.top_k": 2, "model.mod_capacity": CAPACITY,
           "model.mod_every": 1, "train.seq_len": S, "train.batch_size": B, "mesh.data": 1}
  return validate(load_config("mod", **{**small, **overrides}))


def _fill(module, seed):
  """Random weights drawn in numpy (building eagerly would compile one kernel per shape)."""
  rng = np.random.default_rng(seed)
  for _, p in nnx.iter_graph(module):
    if isinstance(p, nnx.Param):
      scale = 1.0 if p.shape == (V, D) else 0.5
      value = (1.0 + 0.1 * rng.standard_normal(p.shape) if p.out_sharding == ("embed",)
               and p.shape == (D,) else scale * rng.standard_normal(p.shape))
      p.set_value(jnp.asarray(value, p.dtype))
  return module


@functools.lru_cache(maxsize=None)
def _blocks():
  """(dense MoD block, MoE MoD block), random weights."""
  m = _config().model
  make = lambda moe: nnx.eval_shape(lambda: Block(m, moe, rngs=nnx.Rngs(0), mod=True))
  return _fill(make(False), 1), _fill(make(True), 2)


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, x, positions, segment_ids, carry):
  block = nnx.merge(graphdef, state)
  return block(x, positions, segment_ids, train=False, rng=None, carry=carry)


def _run(block, x, positions, segment_ids, carry=None):
  return _apply(*nnx.split(block), jnp.asarray(x), jnp.asarray(positions, jnp.int32),
                jnp.asarray(segment_ids, jnp.int32), {} if carry is None else carry)


def _inputs(seed=0):
  """x [B, S, D]; row 0 one segment; row 1 two packed segments; row 2 only K - 1 tokens, then
  padding (so one padding token must be chosen)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, S, D)).astype(np.float32)
  seg = np.ones((B, S), np.int32)
  seg[1, 9:] = 2
  seg[2, K - 1:] = 0
  pos = np.tile(np.arange(S), (B, 1))
  pos[1, 9:] -= 9
  return x, pos.astype(np.int32), seg


def _numpy_choice(x, w, seg):
  """Float64 top-k of r = x w per row, padding last, ties to the earlier token, sorted."""
  r = np.einsum("bsd,d->bs", x.astype(np.float64), np.asarray(w, np.float64))
  ranked = np.where(seg > 0, r, -np.inf)
  index = np.sort(np.argsort(-ranked, axis=1, kind="stable")[:, :K], axis=1)
  return r, index


@pytest.mark.parametrize("which", [0, 1], ids=["dense_ffn", "moe_ffn"])
def test_skipped_bit_identical_and_chosen_match_block_on_chosen_tokens(which):
  block = _blocks()[which]
  x, pos, seg = _inputs()
  out, _, metrics, _ = _run(block, x, pos, seg)
  out = np.asarray(out)
  r, index = _numpy_choice(x, block.mod_router[...], seg)
  chosen = np.zeros((B, S), bool)
  np.put_along_axis(chosen, index, True, axis=1)
  # Exactly k per sequence; the padding of row 2 (chosen to fill k) is unchanged as well.
  assert chosen.sum(1).tolist() == [K] * B
  changed = np.any(out != x, axis=-1)
  np.testing.assert_array_equal(changed, chosen & (seg > 0))
  np.testing.assert_array_equal(out[~chosen], x[~chosen])            # bit for bit
  # Reference: the same block without its router, run on the chosen tokens alone.
  plain = nnx.clone(block)
  plain.mod_router = None
  take = lambda a: np.take_along_axis(a, index.reshape(index.shape + (1,) * (a.ndim - 2)), 1)
  xs = take(x)
  ys, _, _, _ = _run(plain, xs, take(pos), take(seg))
  rs = take(r) * (take(seg) > 0)
  want = xs + rs[..., None] * (np.asarray(ys, np.float64) - xs)
  np.testing.assert_allclose(take(out), want, rtol=1e-5, atol=1e-5)
  assert set(metrics) >= {"mod_loss", "mod_causal_agreement"}
  if which == 1:   # top-2 copies of the chosen real tokens over every real token
    np.testing.assert_allclose(metrics["experts_per_token"],
                               2 * (chosen & (seg > 0)).sum() / (seg > 0).sum(), rtol=1e-6)


def test_router_gradient_closed_form():
  """d/dw sum(c * out) = sum over chosen valid tokens i of (c_i . f_i) x_i, f_i = block(x~)_i -
  x~_i: the choice is locally constant and only r_i = x_i w multiplies f (eq. 1)."""
  block = _blocks()[0]
  x, pos, seg = _inputs(1)
  c = np.random.default_rng(3).standard_normal((B, S, D)).astype(np.float32)
  graphdef, state = nnx.split(block)

  @jax.jit
  def grad_w(state):
    def loss(state):
      out, _, _, _ = nnx.merge(graphdef, state)(jnp.asarray(x), jnp.asarray(pos),
                                                jnp.asarray(seg), train=True, rng=None)
      return jnp.sum(out * c)
    return jax.grad(loss)(state)["mod_router"][...]

  g = np.asarray(grad_w(state))
  r, index = _numpy_choice(x, block.mod_router[...], seg)
  plain = nnx.clone(block)
  plain.mod_router = None
  take = lambda a: np.take_along_axis(a, index.reshape(index.shape + (1,) * (a.ndim - 2)), 1)
  xs = take(x)
  f = np.asarray(_run(plain, xs, take(pos), take(seg))[0], np.float64) - xs
  coef = np.sum(take(c) * f, -1) * (take(seg) > 0)                   # [B, K]
  want = np.einsum("bk,bkd->d", coef, xs)
  assert np.abs(g).max() > 1e-3
  np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-4)


def test_predictor_loss_against_numpy_bce():
  x, _, seg = _inputs(2)
  w = _blocks()[0].mod_router[...]
  r, index = _numpy_choice(x, w, seg)
  chosen = np.zeros((B, S), bool)
  np.put_along_axis(chosen, index, True, axis=1)
  loss, agreement = depth.causal_predictor_loss(jnp.asarray(r, jnp.float32), jnp.asarray(chosen),
                                                jnp.asarray(seg > 0))
  p = 1.0 / (1.0 + np.exp(-r))
  bce = -(chosen * np.log(p) + (~chosen) * np.log1p(-p))
  valid = seg > 0
  np.testing.assert_allclose(float(loss), bce[valid].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(agreement), ((r > 0) == chosen)[valid].mean(), rtol=1e-6)


def test_routing_state_of_skipped_tokens_passes_through():
  """The MoE block's router logits reach the next layer for the chosen rows; the other rows keep
  the state they came with."""
  block = _blocks()[1]
  x, pos, seg = _inputs(4)
  before = {"router_logits": jnp.asarray(
      np.random.default_rng(5).standard_normal((B * S, 4)), jnp.float32)}
  _, _, _, after = _run(block, x, pos, seg, before)
  _, index = _numpy_choice(x, block.mod_router[...], seg)
  rows = (np.arange(B)[:, None] * S + index).reshape(-1)
  got, old = np.asarray(after["router_logits"]), np.asarray(before["router_logits"])
  skipped = np.setdiff1d(np.arange(B * S), rows)
  np.testing.assert_array_equal(got[skipped], old[skipped])
  assert not np.allclose(got[rows], old[rows])


def test_plain_model_parameters_unchanged():
  """Mixture-of-Depths off (capacity 0 or 1) builds the plain model's parameter tree; on, only
  the routed blocks gain `mod_router` (mod_every 2: block 1 of 2), nothing is reordered."""
  def paths(**overrides):
    m = _config(**overrides).model
    tree = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Transformer(m, rngs=nnx.Rngs(0)))))
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
  off = paths(**{"model.mod_capacity": 1.0})
  assert off == paths(**{"model.mod_capacity": 0.0})
  assert not any("mod_router" in p for p in off)
  on = paths(**{"model.mod_every": 2})
  assert [p for p in on if "mod_router" in p] == ["['blocks'][1]['mod_router']"]
  assert [p for p in on if "mod_router" not in p] == off


@pytest.mark.parametrize("field,value", [("model.mod_capacity", 1.5),
                                         ("model.mod_capacity", -0.1),
                                         ("model.mod_every", 0),
                                         ("model.mod_aux_loss_weight", -1.0),
                                         ("model.moe.dispatch", "capacity"),
                                         ("model.moe.layer", "multi_head")])
def test_config_errors_name_the_field(field, value):
  c = load_config("mod", **{field: value})
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    validate_model(c.model)


def test_defaults_validate_without_mod_fields():
  """Configs written before Mixture-of-Depths (no mod_* fields), one layer included, validate."""
  for name in ("default", "dense"):
    c = load_config(name, **{"model.num_layers": 1, "model.moe_every": 1 if name == "default"
                             else 0})
    for field in ("mod_capacity", "mod_every", "mod_aux_loss_weight"):
      del c.model[field]
    validate_model(c.model)
  with pytest.raises(ConfigError, match=r"model\.mod_every"):
    validate_model(load_config("mod", **{"model.num_layers": 1, "model.moe_every": 1}).model)


@pytest.mark.parametrize("variant", [
    {"model.mod_capacity": CAPACITY},
    {"model.moe.chain_iterations": 2, "model.moe.gating_residual": True,
     "model.moe.extra_experts": ("copy", "constant")}])
def test_variants_leave_every_plain_weight_as_drawn(variant):
  """Variant parameters come from side streams (moejax.params.side_rngs): every weight the plain
  model has is drawn the same with the variant on, in later blocks too (seed-paired A/B runs
  start from the same plain weights). Three blocks, MoE in 1 and 2."""
  shape = {"model.num_layers": 3, "model.moe_every": 1, "model.first_dense_layers": 1,
           "model.mod_capacity": 0.0}
  def weights(**overrides):
    m = _config(**{**shape, **overrides}).model
    return nnx.to_flat_state(nnx.state(Transformer(m, rngs=nnx.Rngs(0)), nnx.Param))
  plain = {p: v for p, v in weights()}
  with_variant = {p: v for p, v in weights(**variant)}
  assert len(with_variant) > len(plain)
  for path, value in plain.items():
    other = with_variant[path]
    if value.shape != other.shape:   # extra experts widen the router's gate [D, E']
      assert path[-1] == "gate" and value.shape[:-1] == other.shape[:-1], path
      continue
    np.testing.assert_array_equal(np.asarray(value), np.asarray(other), err_msg=str(path))
