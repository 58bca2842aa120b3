"""Every registered router against one contract, and the defining property of the routers and
balancing options written beside it (deepseek, hash, random, relu, thor, token rounding,
loss-free balancing, lb_loss_scope, describe).

The contract (each router): `Routing` shapes and dtypes; slot indices in [0, E] with distinct
experts per token and weight 0 on "no expert"; group sizes that conserve the copies; padding
not routed; the same decision twice under a fixed key; jit and grad; capacity dispatch with
room for every copy equal to dropless dispatch; 8 devices equal to one; and, for every router
that claims batch independence, a sequence's outputs unchanged when the other sequences change.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import sharding
from moejax.moe import MoELayer, balance
from moejax.moe.layer import balance_groups
from moejax.moe.routing import ROUTERS, describe
from moejax.moe.routing.catalog import markdown_table
from moejax.moe.routing.topk import round_group_sizes_down

import reference as ref
from helpers import ROOT, load_config, set_fields

B, S, D, E, V = 8, 8, 16, 8, 32           # T = 64 tokens, 8 per device on 8 devices
ROUTER_ARGS = {"deepseek": {"num_groups": 4, "topk_groups": 2, "routed_scaling": 2.5},
               "expert_choice": {}, "top_p": {"p": 0.5}}


def _top_k(name):
  return 1 if name in ("switch", "base") else 2


def _model(name, dispatch="dropless", **over):
  m = load_config().model
  set_fields(m, {"d_model": D, "d_ff": 16, "vocab_size": V, "moe.num_experts": E,
                 "moe.top_k": _top_k(name), "moe.router": name, "moe.dispatch": dispatch,
                 "moe.routing_group": 8, "moe.capacity_factor": float(E), **over})
  m.moe.router_args.update(ROUTER_ARGS.get(name, {}))
  return m


def _layer(model, mesh=None):
  """MoELayer with weights drawn in numpy (the same for every mesh and dispatch)."""
  layer = nnx.eval_shape(lambda: MoELayer(model, rngs=nnx.Rngs(0), mesh=mesh))
  rng = np.random.default_rng(0)
  for path, p in nnx.iter_graph(layer):
    if isinstance(p, nnx.Param):
      p.set_value(jnp.asarray(rng.standard_normal(p.shape) * p.shape[0] ** -0.5, p.dtype))
    elif isinstance(p, nnx.Variable):
      p.set_value(jnp.asarray(rng.standard_normal(p.shape) * 0.1, jnp.float32))
  return layer


def _apply(graphdef, state, x, segment_ids, token_ids, train):
  layer = nnx.merge(graphdef, state)
  rng = jax.random.key(3)
  routing = layer.route(x.reshape(-1, D), segment_ids.reshape(-1) > 0, train=train, rng=rng,
                        token_ids=token_ids.reshape(-1), num_sequences=x.shape[0])
  y, aux, metrics = layer(x, segment_ids, train=train, rng=rng, token_ids=token_ids)
  return routing, y, aux, metrics


@functools.partial(jax.jit, static_argnums=(0, 5))
def _with_grad(graphdef, state, x, segment_ids, token_ids, train):
  """(Routing, y, aux loss, metrics) and the gradient of sum(y) + aux w.r.t. the state."""
  def loss(state):
    out = _apply(graphdef, state, x, segment_ids, token_ids, train)
    return jnp.sum(out[1]) + out[2], out
  (_, out), grads = jax.value_and_grad(loss, has_aux=True)(state)
  return out, grads


@functools.partial(jax.jit, static_argnums=(0, 5))
def _forward(graphdef, state, x, segment_ids, token_ids, train):
  return _apply(graphdef, state, x, segment_ids, token_ids, train), None


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, S, D)).astype(np.float32)
  seg = np.ones((B, S), np.int32)
  seg[-1, -3:] = 0                                              # padding at the end of a row
  ids = rng.integers(0, V, (B, S)).astype(np.int32)
  return x, seg, ids


def _outputs(name, dispatch="dropless", mesh=None, train=True, inputs=None, grad=False):
  layer = _layer(_model(name, dispatch), mesh)
  x, seg, ids = _inputs() if inputs is None else inputs
  args = [jnp.asarray(a) for a in (x, seg, ids)]
  if mesh is not None:
    spec = NamedSharding(mesh, P(sharding.logical_to_spec(("batch",), None, mesh)[0]))
    args = [jax.device_put(a, spec) for a in args]
  out, grads = (_with_grad if grad else _forward)(*nnx.split(layer), *args, train)
  return layer, jax.tree.map(np.asarray, (out, grads))


@functools.lru_cache(maxsize=None)
def _one_device(name, train=True):
  """Training mode with gradients, evaluation mode without (one compile each per router)."""
  return _outputs(name, train=train, grad=train)


def _routers():
  return sorted(ROUTERS)


@pytest.mark.parametrize("name", _routers())
def test_routing_contract(name):
  layer, ((routing, y, aux, metrics), grads) = _one_device(name)
  t, k = B * S, layer.router.num_slots
  idx, w = routing.expert_index, routing.combine_weights
  assert idx.shape == (t, k) and idx.dtype == np.int32
  assert w.shape == (t, k) and w.dtype == np.float32
  assert routing.router_probs.shape == (t, E) and routing.router_probs.dtype == np.float32
  np.testing.assert_allclose(routing.router_probs.sum(-1), 1.0, rtol=1e-5)
  assert ((idx >= 0) & (idx <= E)).all()
  assert (w[idx == E] == 0).all()
  for row in idx:                                   # a token's experts are distinct
    real = row[row < E]
    assert len(set(real.tolist())) == len(real)
  # Conservation: the group sizes count exactly the real copies.
  np.testing.assert_array_equal(routing.group_sizes, np.bincount(idx[idx < E], minlength=E))
  # Padding (the last 3 tokens) is not routed.
  assert (idx[-3:] == E).all() and not routing.token_mask[-3:].any()
  np.testing.assert_allclose(metrics["load"].sum(), 1.0, rtol=1e-5)
  assert np.isfinite(y).all() and np.isfinite(aux)
  for leaf in jax.tree.leaves(grads):
    assert np.isfinite(leaf).all()
  if layer.router.has_gate:
    assert np.abs(grads["router"]["gate"]).max() > 0 or name in ("base",)
  # experts_per_token: the routed copies over the routed tokens (nothing dropped here).
  np.testing.assert_allclose(metrics["experts_per_token"], (idx < E).sum() / (t - 3), rtol=1e-5)
  # Deterministic under a fixed key.
  _, ((again, *_), _) = _outputs(name, grad=True)          # the compiled step, run again
  np.testing.assert_array_equal(again.expert_index, idx)
  np.testing.assert_array_equal(again.combine_weights, w)


@pytest.mark.parametrize("name", _routers())
def test_capacity_with_room_equals_dropless(name):
  if "capacity" not in ROUTERS[name].dispatch_modes:
    with pytest.raises(Exception, match="model.moe.dispatch"):
      from moejax.config import validate_model
      validate_model(_model(name, "capacity"))
    return
  _, ((_, y0, _, m0), _) = _one_device(name, train=False)
  _, ((_, y1, _, m1), _) = _outputs(name, "capacity", train=False)
  assert float(m1["dropped_frac"]) == 0.0
  np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", _routers())
def test_eight_devices_equal_one(name):
  mesh = sharding.make_mesh(load_config(**{"mesh.data": 8}).mesh, jax.devices())
  _, ((r0, y0, aux0, m0), _) = _one_device(name)
  _, ((r8, y8, aux8, m8), _) = _outputs(name, mesh=mesh)
  np.testing.assert_array_equal(r8.expert_index, r0.expert_index)
  np.testing.assert_allclose(y8, y0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux8, aux0, rtol=1e-5, atol=1e-7)
  for key in m0:
    np.testing.assert_allclose(m8[key], m0[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("name", _routers())
def test_batch_independence_is_as_claimed(name):
  """Change every sequence but the first: a batch-independent router leaves the first
  sequence's outputs alone (evaluation mode, dropless)."""
  x, seg, ids = _inputs()
  _, ((r0, y0, _, _), _) = _one_device(name, train=False)
  x2, _, ids2 = _inputs(seed=1)
  x2[0], ids2[0] = x[0], ids[0]
  _, ((r1, y1, _, _), _) = _outputs(name, train=False, inputs=(x2, seg, ids2))
  same = np.allclose(y1[0], y0[0], rtol=1e-6, atol=1e-6)
  if ROUTERS[name].batch_independent or name == "base":   # BASE is greedy top-1 at eval
    assert same
    np.testing.assert_array_equal(r1.expert_index[:S], r0.expert_index[:S])
  else:
    assert not same, f"{name} claims batch dependence; this case shows none"


def test_describe_and_readme_table():
  rows = {r["router"]: r for r in describe()}
  assert set(rows) == set(ROUTERS)
  for name, r in rows.items():
    doc = ROUTERS[name].__doc__ or ""
    assert "arXiv:" in doc, f"router {name} cites no paper"
  assert not rows["expert_choice"]["batch_independent"] if "expert_choice" in rows else True
  with open(os.path.join(ROOT, "README.md")) as f:
    assert markdown_table() in f.read(), "README's router table is stale: paste markdown_table()"


# ----------------------------------------------------------------------------- deepseek


def _deepseek_reference(logits, bias, k, groups, topk_groups, scaling):
  """DeepSeek-V3 routing in float64 (arXiv:2412.19437 eqs. 12-16; dropped groups are out)."""
  s = ref.sigmoid(logits)
  c = s + bias
  t, e = c.shape
  g = c.reshape(t, groups, e // groups)
  gscore = np.sort(g, -1)[..., -2:].sum(-1)
  keep = np.argsort(-gscore, -1, kind="stable")[:, :topk_groups]
  mask = np.zeros((t, groups), bool)
  np.put_along_axis(mask, keep, True, -1)
  c = np.where(np.repeat(mask, e // groups, -1), c, -np.inf)
  idx = np.argsort(-c, -1, kind="stable")[:, :k]
  w = np.take_along_axis(s, idx, -1)
  return idx, w / w.sum(-1, keepdims=True) * scaling


def test_deepseek_matches_the_papers_rule():
  layer, ((routing, *_), _) = _one_device("deepseek", train=False)
  x, seg, _ = _inputs()
  logits = x.reshape(-1, D).astype(np.float64) @ np.asarray(layer.router.gate[...], np.float64)
  bias = np.asarray(layer.router.bias[...], np.float64)
  assert np.abs(bias).max() > 0                        # the bias takes part in the selection
  idx, w = _deepseek_reference(logits, bias, 2, 4, 2, 2.5)
  live = seg.reshape(-1) > 0
  np.testing.assert_array_equal(routing.expert_index[live], idx[live])
  np.testing.assert_allclose(routing.combine_weights[live], w[live], rtol=1e-5)
  # Group limit: the chosen experts lie in at most topk_groups = 2 of the 4 groups.
  assert max(len(set((row // 2).tolist())) for row in routing.expert_index[live]) <= 2


# ----------------------------------------------------------------------------- hash, random


def test_hash_routes_by_token_id_alone():
  layer, ((routing, *_), _) = _one_device("hash", train=False)
  assert layer.router.gate is None                                 # no gate parameters
  assert not any(isinstance(v, nnx.Param) for _, v in nnx.iter_graph(layer.router))
  x, seg, ids = _inputs()
  flat_ids, live = ids.reshape(-1), seg.reshape(-1) > 0
  first = {}
  for tok, row in zip(flat_ids[live], routing.expert_index[live]):
    assert first.setdefault(int(tok), tuple(row)) == tuple(row)   # same id, same experts
  # The same ids in another context (other hidden states, other neighbours) route the same.
  x2, _, _ = _inputs(seed=5)
  _, ((r2, *_), _) = _outputs("hash", train=False, inputs=(x2, seg, ids))
  np.testing.assert_array_equal(r2.expert_index, routing.expert_index)
  # Balanced: every expert owns V/E ids as first expert; slot 2 is the next expert.
  owner = np.asarray(layer.router.expert_of_token(jnp.arange(V)))
  np.testing.assert_array_equal(np.bincount(owner, minlength=E), V // E)
  np.testing.assert_array_equal(routing.expert_index[live][:, 1],
                                (routing.expert_index[live][:, 0] + 1) % E)


def test_random_routing_is_uniform_and_keyed():
  _, ((r_train, *_), _) = _one_device("random", train=True)
  _, ((r_eval, *_), _) = _one_device("random", train=False)
  assert (r_train.expert_index != r_eval.expert_index).any()     # the step's key vs the fixed one
  np.testing.assert_allclose(r_train.combine_weights[:-3], 0.5)
  # Uniform: over many tokens each expert gets about T*K/E copies (chi-square, 7 dof).
  router = _layer(_model("random")).router
  idx, _, _ = router.decide(jnp.zeros((4096, E)), train=True, rng=jax.random.key(9),
                            token_ids=None)
  counts = np.bincount(np.asarray(idx).ravel(), minlength=E)
  expected = 4096 * 2 / E
  assert ((counts - expected) ** 2 / expected).sum() < 24.3      # p = 0.001


# ----------------------------------------------------------------------------- thor


def test_thor_two_random_experts_and_their_consistency_loss():
  layer, ((routing, y, aux, metrics), _) = _one_device("thor", train=True)
  live = routing.token_mask
  idx = routing.expert_index[live]
  assert (idx[:, 0] != idx[:, 1]).all() and (idx < E).all()
  np.testing.assert_allclose(routing.combine_weights[live], 0.5)
  # The loss is the mean squared difference of the two experts' outputs, in float64.
  x, _, _ = _inputs()
  xt = x.reshape(-1, D).astype(np.float64)[live]
  w = {k: np.asarray(v, np.float64) for k, v in layer.experts.weights().items()}
  out = lambda e_idx: np.stack([ref.ffn(xt[i:i + 1], {k: v[e] for k, v in w.items()}, "swiglu")[0]
                                for i, e in enumerate(e_idx)])
  y1, y2 = out(idx[:, 0]), out(idx[:, 1])
  np.testing.assert_allclose(metrics["slot_loss"], np.mean((y1 - y2) ** 2), rtol=1e-4)
  np.testing.assert_allclose(y.reshape(-1, D)[live], (y1 + y2) / 2, rtol=1e-4, atol=1e-5)
  _, ((r_eval, *_), _) = _one_device("thor", train=False)      # one expert at evaluation
  assert (r_eval.expert_index[:, 1] == E).all()


# ----------------------------------------------------------------------------- relu (ReMoE)


def test_relu_gates_and_l1_loss():
  layer, ((routing, y, aux, metrics), _) = _one_device("relu", train=False)
  x, seg, _ = _inputs()
  live = seg.reshape(-1) > 0
  logits = x.reshape(-1, D).astype(np.float64) @ np.asarray(layer.router.gate[...], np.float64)
  gates = np.maximum(logits, 0)[live]
  np.testing.assert_array_equal(routing.expert_index[live] < E, gates > 0)
  np.testing.assert_allclose(routing.combine_weights[live], gates, rtol=1e-5, atol=1e-6)
  f = E / (2 * live.sum()) * (gates > 0).sum(0)
  l1 = np.sum(f * gates.mean(0))
  coef = float(metrics["relu_l1_coef"])
  np.testing.assert_allclose(metrics["router_loss"], coef * l1, rtol=1e-4)
  np.testing.assert_allclose(metrics["relu_sparsity"], 1 - (gates > 0).mean(), rtol=1e-6)


def test_relu_sparsity_moves_to_the_target_in_a_short_run():
  """ReMoE's adaptive L1 coefficient (eq. 6) drives the active experts per token from about
  E/2 at initialisation to the target K = 2. (alpha 1.05 rather than the paper's 1.2: with
  this run's learning rate 1.2 overshoots and the ReLU gates die before lambda can recover.)"""
  from moejax.train import Trainer
  from moejax import data
  cfg = load_config(**{"model.d_model": 16, "model.num_layers": 1, "model.num_heads": 2,
                       "model.num_kv_heads": 2, "model.head_dim": 8, "model.d_ff": 32,
                       "model.moe.router": "relu", "train.batch_size": 8,
                       "train.seq_len": 16, "train.steps": 140, "train.warmup_steps": 10})
  cfg.model.moe.router_args.l1_coef_init = 1e-2
  cfg.model.moe.router_args.l1_coef_rate = 1.05
  trainer = Trainer(cfg, mesh=_one_device_mesh(cfg))
  state = trainer.init_state()
  source = data.make_sources(cfg)["train"]
  per_token = []
  for _ in range(cfg.train.steps):
    state, out = trainer.train_step(state, trainer.put_batch(source.next()))
    per_token.append(float(out["moe/layer_0/experts_per_token"]))
  assert per_token[0] > 3.0
  assert abs(np.mean(per_token[-40:]) - 2.0) < 0.4, per_token[-40:]


# ----------------------------------------------------------------------------- token rounding


def test_token_rounding_takes_the_lowest_scored_copies():
  rng = np.random.default_rng(4)
  t, k, tile = 64, 2, 4
  scores = rng.random((t, E))
  idx = np.argsort(-scores, -1)[:, :k].astype(np.int32)
  w = np.take_along_axis(scores, idx, -1).astype(np.float32)
  new_idx, new_w = map(np.asarray, round_group_sizes_down(jnp.asarray(idx), jnp.asarray(w), E, tile))
  sizes = np.bincount(new_idx[new_idx < E], minlength=E)
  assert (sizes % tile == 0).all()
  np.testing.assert_array_equal(sizes, np.bincount(idx.ravel(), minlength=E) // tile * tile)
  for e in range(E):                    # the removed copies of e score below every kept one
    kept, gone = w[(idx == e) & (new_idx == e)], w[(idx == e) & (new_idx == E)]
    if len(gone) and len(kept):
      assert gone.max() <= kept.min()
  assert (new_w[new_idx == E] == 0).all()
  moved = (new_idx == E).sum()
  assert 0 < moved < tile * E


# ----------------------------------------------------------------------------- balancing


def test_loss_free_balancing_fixes_a_skewed_router():
  """Bias balancing alone (no gradient step) brings MaxVio below 0.1 on a router whose gate
  favours two experts (arXiv:2408.15664, Alg. 1): fresh tokens each step, the bias moved by
  u * sign(mean load - load)."""
  model = _model("topk", **{"moe.bias_update_rate": 0.002})
  layer = _layer(model)
  layer.router.bias[...] = jnp.zeros((E,))
  layer.router.gate[...] = layer.router.gate[...] + jnp.array([0.2, 0.16] + [0.0] * 6)
  graphdef, state = nnx.split(layer)

  @jax.jit
  def step(state, key):
    layer = nnx.merge(graphdef, state)
    # 4096 tokens: the load's sampling noise alone stays well below MaxVio 0.1.
    x = jax.random.normal(key, (4096, D)) + 0.5          # with the gate: experts 0, 1 favoured
    routing = layer.route(x)
    layer.router.update_state(routing.metrics)
    return nnx.state(layer), routing.metrics["max_vio"]

  vio = []
  for i in range(300):
    state, v = step(state, jax.random.key(i))
    vio.append(float(v))
  assert vio[0] > 1.5
  assert np.mean(vio[-50:]) < 0.1, vio[-50:]


def _one_device_mesh(cfg):
  return sharding.make_mesh(cfg.mesh, jax.devices()[:1])


def test_loss_free_bias_gets_no_gradient_and_resumes(tmp_path):
  """In the train step the bias moves by exactly +-u (no optimizer update reaches it), and a
  checkpoint restores it: 3 steps, save, restore, 3 more equal 6 uninterrupted steps."""
  from moejax.train import Trainer
  from moejax import checkpoint, data
  over = {"model.d_model": 16, "model.num_layers": 1, "model.num_heads": 2,
          "model.num_kv_heads": 2, "model.head_dim": 8, "model.d_ff": 32,
          "model.moe.bias_update_rate": 0.05, "train.batch_size": 8, "train.seq_len": 16,
          "train.steps": 6, "train.warmup_steps": 1, "train.checkpoint_every": 3,
          "train.eval_every": 6, "train.eval_batches": 1, "train.log_every": 3}
  cfg = load_config(**over)
  trainer = Trainer(cfg, mesh=_one_device_mesh(cfg))
  source = data.make_sources(cfg)["train"]
  batches = [source.next() for _ in range(6)]
  bias = lambda s: np.asarray(s["params"]["blocks"][0]["ffn"]["router"]["bias"])
  state = trainer.init_state()
  biases = []
  for i, b in enumerate(batches):
    before = bias(state)
    state, _ = trainer.train_step(state, trainer.put_batch(b))
    biases.append(bias(state))
    moved = np.abs(biases[-1] - before)
    assert moved.max() > 0
    np.testing.assert_allclose(moved[moved > 0], 0.05, rtol=1e-5)      # +-u or 0 (load = mean)
    if i == 2:
      ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=1, every=1)
      ckpt.save(3, state, {"data": {}}, force=True)
      ckpt.close()
  step, restored, _ = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=1, every=1).restore(
      abstract_state=trainer.abstract_state())
  assert step == 3
  np.testing.assert_array_equal(bias(restored), biases[2])
  for b in batches[3:]:
    restored, _ = trainer.train_step(restored, trainer.put_batch(b))
  np.testing.assert_array_equal(bias(restored), biases[-1])


def test_lb_loss_scopes_on_single_domain_sequences():
  """Two sequences, each sent wholly to its own expert: the global-batch loss sees a balanced
  batch (E * sum f_e P_e with f = (1/2, 1/2)), the sequence-wise loss (DeepSeek-V3 eq. 17-20)
  and a 2-device micro-batch loss see each sequence collapsed on one expert."""
  e, s = 2, 4
  probs = np.array([[0.9, 0.1]] * s + [[0.2, 0.8]] * s, np.float32)
  idx = np.array([[0]] * s + [[1]] * s, np.int32)
  mask = np.ones(2 * s, bool)
  glob = e * (0.5 * probs[:, 0].mean() + 0.5 * probs[:, 1].mean())          # f = (1/2, 1/2)
  seq = np.mean([e * 1.0 * probs[:s, 0].mean(), e * 1.0 * probs[s:, 1].mean()])  # f = (1, 0), (0, 1)
  for scope, want in [("global_batch", glob), ("sequence", seq), ("micro_batch", seq)]:
    n = balance_groups(scope, num_batch_shards=2, num_sequences=2)
    got = balance.load_balancing_loss(jnp.asarray(probs), jnp.asarray(idx), jnp.asarray(mask), n)
    np.testing.assert_allclose(float(got), want, rtol=1e-6, err_msg=scope)
  assert seq > glob + 0.5


def test_lb_loss_scope_reaches_the_layer():
  x, seg, ids = _inputs()
  live = (seg.reshape(-1) > 0)
  for scope in ("global_batch", "sequence"):
    layer = _layer(_model("topk", **{"moe.lb_loss_scope": scope}))
    y, aux, m = layer(jnp.asarray(x), jnp.asarray(seg), token_ids=jnp.asarray(ids))
    logits = x.reshape(-1, D).astype(np.float64) @ np.asarray(layer.router.gate[...], np.float64)
    idx, _, probs, _ = ref.route(logits, "topk", 2)
    groups = [np.arange(B * S)] if scope == "global_batch" else np.split(np.arange(B * S), B)
    losses = []
    for g in groups:
      g = g[live[g]]
      f = np.bincount(idx[g].ravel(), minlength=E) / idx[g].size
      losses.append(E * np.sum(f * probs[g].mean(0)))
    np.testing.assert_allclose(float(m["lb_loss"]), np.mean(losses), rtol=1e-5, err_msg=scope)
