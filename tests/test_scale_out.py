"""Scale-out on 8 simulated devices: every mesh layout gives one device's numbers, and every device
does only its share of the work.

- The MoE layer alone (outputs, auxiliary loss, gradients of inputs and every weight) on each
  layout of the issue, for dropless (all-to-all and ring under expert parallelism) and capacity
  dispatch, against the same layer without a mesh.
- Whole train steps (3 steps: losses, gradient norms, parameters) on a subset, whose compiled
  step also gives the per-device FLOPs (`cost_analysis`), the collectives (HLO text) and the
  parameter shards.
- Expert-parallel overflow: with a small `ep_capacity_factor` the copies dropped are exactly
  those a plain-Python model of the fixed buffers predicts.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import data, sharding
from moejax.moe import MoELayer, moe_dims
from moejax.moe.dispatch.capacity import expert_capacity
from moejax.moe.dispatch.expert_parallel import a2a_buffer_rows, ring_buffer_rows
from moejax.train import BATCH_KEYS, Trainer

import reference as ref
from helpers import load_config, set_fields

AXES = ("data", "fsdp", "expert", "tensor")
# The layouts of the issue (8 devices each).
MESHES = {
    "data8": dict(data=8),
    "fsdp8": dict(fsdp=8),
    "expert4_data2": dict(expert=4, data=2),
    "expert8": dict(expert=8),
    "expert2_fsdp2_data2": dict(expert=2, fsdp=2, data=2),
    "expert4_tensor2": dict(expert=4, tensor=2),
}
# dropless/all_to_all and dropless/ring differ only under expert parallelism.
MODES = ("dropless/all_to_all", "dropless/ring", "capacity")
LAYER_CASES = [(m, mode) for m in MESHES for mode in MODES
               if "expert" in MESHES[m] or mode != "dropless/ring"]


def _mesh_config(sizes):
  c = load_config().mesh
  for a in AXES:
    c[a] = sizes.get(a, 1)
  return c


def _mesh(sizes):
  return sharding.make_mesh(_mesh_config(sizes), jax.devices())


# ----------------------------------------------------------------------------- the layer alone

B, S, D = 16, 8, 16          # T = 128 tokens: 16 per device on 8 batch shards


def _layer_model(mode, factor=0.0, **overrides):
  dispatch, _, exchange = mode.partition("/")
  m = load_config().model
  set_fields(m, {"d_model": D, "d_ff": 32, "moe.num_experts": 8, "moe.top_k": 2,
                 "moe.dispatch": dispatch, "moe.ep_exchange": exchange or "all_to_all",
                 "moe.ep_capacity_factor": factor, "moe.routing_group": 8,
                 "moe.capacity_factor": 1.0, "moe.num_shared_experts": 1, **overrides})
  return m


def _layer(model, mesh, seed=0):
  """MoELayer(model, mesh) with weights drawn in numpy (the same for every mesh)."""
  layer = nnx.eval_shape(lambda: MoELayer(model, rngs=nnx.Rngs(0), mesh=mesh))
  rng = np.random.default_rng(seed)
  for _, p in nnx.iter_graph(layer):
    if isinstance(p, nnx.Param):
      p.set_value(jnp.asarray(rng.standard_normal(p.shape) * p.shape[-2] ** -0.5, p.dtype))
  return layer


@functools.partial(jax.jit, static_argnums=0)
def _layer_outputs(graphdef, state, x, segment_ids, cot):
  """y, aux loss, metrics and the gradients of sum(y * cot) + aux loss (state and x)."""
  def loss(state, x):
    y, aux, metrics = nnx.merge(graphdef, state)(x, segment_ids)
    return jnp.sum(y * cot) + aux, (y, aux, metrics)
  (_, (y, aux, metrics)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(state, x)
  return y, aux, metrics, grads


def _inputs(seed=1):
  keys = jax.random.split(jax.random.key(seed), 2)
  x = jax.random.normal(keys[0], (B, S, D))
  cot = jax.random.normal(keys[1], (B, S, D))
  return x, jnp.ones((B, S), jnp.int32), cot


def _run_layer(mode, mesh_sizes, factor=0.0, seed=0, x=None, segment_ids=None, **overrides):
  model = _layer_model(mode, factor, **overrides)
  mesh = None if mesh_sizes is None else _mesh(mesh_sizes)
  layer = _layer(model, mesh, seed)
  x0, ids0, cot = _inputs()
  x = x0 if x is None else x
  segment_ids = ids0 if segment_ids is None else segment_ids
  if mesh is not None:
    spec = NamedSharding(mesh, P(sharding.logical_to_spec(("batch",), None, mesh)[0]))
    x, segment_ids, cot = (jax.device_put(a, spec) for a in (x, segment_ids, cot))
  out = _layer_outputs(*nnx.split(layer), x, segment_ids, cot)
  return layer, jax.tree.map(np.asarray, out)


@functools.lru_cache(maxsize=None)
def _unsharded(mode):
  return _run_layer(mode, None)[1]


def _assert_same_layer_outputs(got, want):
  (y, aux, metrics, grads), (y0, aux0, metrics0, grads0) = got, want
  scale = lambda a: 1e-5 * max(1.0, float(np.abs(a).max()))
  np.testing.assert_allclose(y, y0, rtol=1e-5, atol=scale(y0))
  np.testing.assert_allclose(aux, aux0, rtol=1e-5)
  for name in metrics0:
    np.testing.assert_allclose(metrics[name], metrics0[name], rtol=1e-5, atol=1e-6, err_msg=name)
  assert float(metrics["dropped_frac"]) == float(metrics0["dropped_frac"])
  flat, flat0 = jax.tree.leaves_with_path(grads), jax.tree.leaves(grads0)
  assert len(flat) == len(flat0)
  for (path, g), g0 in zip(flat, flat0):
    np.testing.assert_allclose(g, g0, rtol=1e-5, atol=scale(g0), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("mesh_name,mode", LAYER_CASES,
                         ids=[f"{m}-{mode}" for m, mode in LAYER_CASES])
def test_layer_on_every_mesh_equals_one_device(mesh_name, mode):
  _assert_same_layer_outputs(_run_layer(mode, MESHES[mesh_name])[1], _unsharded(mode))


@pytest.mark.parametrize("mesh_name,mode,fused", [("data8", "dropless/all_to_all", True),
                                                  ("expert4_tensor2", "dropless/ring", False)])
def test_chunked_backend_on_a_mesh_equals_one_device(mesh_name, mode, fused):
  """The `chunked` backend inside shard_map (its loops' carries vary over the mesh axes as
  their bodies do) gives one device's numbers, with `model.moe.fused_gather` (rows read through
  the sort index; its custom VJP sums the weight gradients over the batch shards) on data=8,
  and under expert and tensor parallelism."""
  options = {"moe.gmm_backend": "chunked", "moe.fused_gather": fused}
  got = _run_layer(mode, MESHES[mesh_name], **options)[1]
  _assert_same_layer_outputs(got, _unsharded(mode))


def test_capacity_drops_are_those_of_one_device():
  """Capacity per routing group comes from the config: the layouts drop the same copies, and
  some copies are dropped (capacity factor 1.0 with a skewed router)."""
  want = _unsharded("capacity")
  assert 0 < float(want[2]["dropped_frac"]) < 1
  for name in ("expert4_data2", "expert4_tensor2"):
    np.testing.assert_allclose(_run_layer("capacity", MESHES[name])[1][0], want[0], rtol=1e-5,
                               atol=1e-5)


# ----------------------------------------------------------------------------- overflow


def _reference_output(layer, x64, idx, weights, keep):
  """Float64 layer output: shared experts plus every kept copy's weighted expert FFN."""
  w = {n: np.asarray(p[...], np.float64) for n, p in layer.experts.w.items()}
  shared = {n: np.asarray(p[...], np.float64) for n, p in layer.shared.w.items()}
  y = ref.ffn(x64, shared, "swiglu")
  for t, slot in zip(*np.nonzero(keep)):
    expert = {n: v[idx[t, slot]] for n, v in w.items()}
    y[t] += weights[t, slot] * ref.ffn(x64[t:t + 1], expert, "swiglu")[0]
  return y


def _a2a_kept(idx, num_experts, blocks, ep, rows):
  """Python model of the all-to-all buffers: in each device's block of tokens, copies in
  (expert, token, slot) order; each destination shard takes the first `rows` of its copies."""
  keep = np.zeros(idx.shape, bool)
  per_block, e_l = idx.shape[0] // blocks, num_experts // ep
  for b in range(blocks):
    taken = [0] * ep
    copies = sorted((idx[t, k], t, k) for t in range(b * per_block, (b + 1) * per_block)
                    for k in range(idx.shape[1]) if idx[t, k] < num_experts)
    for e, t, k in copies:
      if taken[e // e_l] < rows:
        keep[t, k] = True
      taken[e // e_l] += 1
  return keep


def _ring_kept(idx, num_experts, blocks, ep, rows):
  """Python model of the ring buffers: the EP consecutive blocks of one expert group are
  gathered; each shard takes the first `rows` copies to its experts in (expert, token, slot)
  order."""
  keep = np.zeros(idx.shape, bool)
  per_group, e_l = idx.shape[0] // (blocks // ep), num_experts // ep
  for g in range(blocks // ep):
    for j in range(ep):
      copies = sorted((idx[t, k], t, k) for t in range(g * per_group, (g + 1) * per_group)
                      for k in range(idx.shape[1]) if idx[t, k] // e_l == j)
      for e, t, k in copies[:rows]:
        keep[t, k] = True
  return keep


@pytest.mark.parametrize("exchange", ["all_to_all", "ring"])
def test_expert_parallel_overflow_drops_what_the_buffers_predict(exchange):
  sizes, factor = MESHES["expert4_data2"], 0.5
  layer, (y, _, metrics, _) = _run_layer(f"dropless/{exchange}", sizes, factor, seed=3)
  x, _, _ = _inputs()
  x64 = np.asarray(x, np.float64).reshape(-1, D)
  gate = np.asarray(layer.router.gate[...], np.float64)
  dims = moe_dims(_layer_model("dropless"))
  e, k = dims.experts, dims.experts_per_token
  idx, weights, _, margin = ref.route(x64 @ gate, "topk", k)
  assert margin > 1e-5
  blocks, ep = 8, sizes["expert"]
  tokens = x64.shape[0] // blocks
  if exchange == "all_to_all":
    keep = _a2a_kept(idx, e, blocks, ep, a2a_buffer_rows(tokens, k, e, ep, factor))
  else:
    keep = _ring_kept(idx, e, blocks, ep, ring_buffer_rows(tokens, k, e, ep, factor))
  dropped = int((~keep).sum())
  assert 0 < dropped < idx.size
  assert float(metrics["dropped_frac"]) == pytest.approx(dropped / idx.size, abs=1e-7)
  np.testing.assert_allclose(y.reshape(-1, D), _reference_output(layer, x64, idx, weights, keep),
                             rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- padding


def test_padding_is_not_routed():
  """Segment id 0: no expert, no capacity slot, no loss, load or MaxVio; the other tokens get
  what a float64 reference gives them with the padding left out."""
  mode = "capacity"
  x, _, _ = _inputs()
  pad = np.zeros((B, S), bool)
  pad[:, -3:] = True                                     # 3 padding tokens at each row's end
  pad[0, :4] = True
  segment_ids = jnp.asarray(np.where(pad, 0, 1), jnp.int32)
  layer, (y, _, metrics, _) = _run_layer(mode, None, seed=5, segment_ids=segment_ids)
  model = _layer_model(mode)
  dims = moe_dims(model)
  e, k = dims.experts, dims.experts_per_token
  x64 = np.asarray(x, np.float64).reshape(-1, D)
  logits = x64 @ np.asarray(layer.router.gate[...], np.float64)
  idx, weights, probs, margin = ref.route(logits, "topk", k)
  assert margin > 1e-5
  routed = ~pad.reshape(-1)
  idx = np.where(routed[:, None], idx, e)
  cap = expert_capacity(model.moe.routing_group, e, k, model.moe.capacity_factor)
  keep = ref.capacity_keep(idx, e, model.moe.routing_group, cap)
  np.testing.assert_allclose(y.reshape(-1, D), _reference_output(layer, x64, idx, weights, keep),
                             rtol=1e-4, atol=1e-5)
  # Losses and metrics over the routed tokens only.
  f = np.bincount(idx[routed].ravel(), minlength=e) / (routed.sum() * k)
  p = probs[routed].mean(0)
  np.testing.assert_allclose(metrics["lb_loss"], e * np.sum(f * p), rtol=1e-5)
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(metrics["z_loss"], np.mean(lse[routed] ** 2), rtol=1e-5)
  np.testing.assert_allclose(metrics["load"], f, rtol=1e-6)
  np.testing.assert_allclose(metrics["max_vio"], f.max() * e - 1, rtol=1e-5)
  kept_routed = keep[routed].sum()
  np.testing.assert_allclose(metrics["dropped_frac"], 1 - kept_routed / (routed.sum() * k),
                             rtol=1e-6)


# ----------------------------------------------------------------------------- train steps


def _step_config(mode, sizes, factor=0.0):
  dispatch, _, exchange = mode.partition("/")
  c = load_config()
  c.model.update(vocab_size=32, d_model=32, num_heads=2, num_kv_heads=2, head_dim=16, d_ff=64,
                 num_layers=1, max_len=32)
  c.model.moe.update(num_experts=8, top_k=2, dispatch=dispatch, routing_group=32,
                     ep_exchange=exchange or "all_to_all", ep_capacity_factor=factor)
  c.data.update(num_domains=2, branching=2)
  # 8,192 tokens: 2,048 expert rows per device on 8 devices, so the grouped matmul's padding
  # (blocked: at most min(E, M) * (tm - 1) rows) is the same fraction on 1 and 8 devices.
  c.train.update(batch_size=256, seq_len=32, lr=1e-2, warmup_steps=1)
  c.mesh = _mesh_config(sizes)
  return c


def _compile(config, num_devices):
  trainer = Trainer(config, mesh=sharding.make_mesh(config.mesh, jax.devices()[:num_devices]))
  batch = {k: jax.ShapeDtypeStruct((config.train.batch_size, config.train.seq_len), jnp.int32,
                                   sharding=trainer.batch_sharding) for k in BATCH_KEYS}
  compiled = trainer.train_step.lower(trainer.abstract_state(), batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return trainer, compiled, cost["flops"]


def _train(config, num_devices, steps=3):
  trainer, compiled, flops = _compile(config, num_devices)
  source = data.make_source(config, "train")
  state, outs = trainer.init_state(), []
  for _ in range(steps):
    state, out = compiled(state, trainer.put_batch(source.next()))
    outs.append({k: float(out[k]) for k in ("train/loss", "train/grad_norm")})
  return dict(trainer=trainer, compiled=compiled, flops=flops, outs=outs,
              params=jax.tree.map(np.asarray, state["params"]), state=state)


@functools.lru_cache(maxsize=None)
def _one_device(dispatch):
  return _train(_step_config(dispatch, dict(data=1)), 1)


# (mesh, mode): each batch axis with each dispatch mode once (the FLOPs goal; the layer tests
# above cover every pair), and the expert-parallel strategies, whose worst-case buffers
# (ep_capacity_factor 0) never drop, so they must match one device. benchmarks/mesh_layouts.py
# measures every layout.
STEP_CASES = [("data8", "dropless/all_to_all"), ("fsdp8", "capacity"),
              ("expert4_tensor2", "capacity"), ("expert4_data2", "dropless/all_to_all"),
              ("expert2_fsdp2_data2", "dropless/ring")]
FLOPS_BOUND = 1.15


@pytest.mark.parametrize("mesh_name,mode", STEP_CASES, ids=[f"{m}-{d}" for m, d in STEP_CASES])
def test_train_steps_on_eight_devices(mesh_name, mode):
  sizes = MESHES[mesh_name]
  one = _one_device(mode.partition("/")[0])
  got = _train(_step_config(mode, sizes), 8)
  for a, b in zip(got["outs"], one["outs"]):
    np.testing.assert_allclose(a["train/loss"], b["train/loss"], rtol=1e-5)
    np.testing.assert_allclose(a["train/grad_norm"], b["train/grad_norm"], rtol=1e-5)
  for (path, p), p0 in zip(jax.tree.leaves_with_path(got["params"]),
                           jax.tree.leaves(one["params"])):
    np.testing.assert_allclose(p, p0, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  hlo = got["compiled"].as_text()
  ep = sizes.get("expert", 1)
  if ep > 1:
    # Each device holds 1/EP of every expert tensor.
    for name, w in got["state"]["params"]["blocks"][0]["ffn"]["experts"]["w"].items():
      for shard in w.addressable_shards:
        assert shard.data.shape[0] == w.shape[0] // ep, name
    collective = "all-to-all" if mode != "dropless/ring" else "reduce-scatter"
    assert collective in hlo, f"no {collective} in the compiled step"
  if mode == "dropless/all_to_all" and ep == 1:
    assert "all-to-all" not in hlo
  if mode.startswith("dropless") and ep == 1 or mode == "capacity":
    # No worst-case buffers here: the work is split 8 ways.
    assert got["flops"] * 8 <= FLOPS_BOUND * one["flops"], got["flops"] * 8 / one["flops"]


@pytest.mark.parametrize("mesh_name,mode", [("expert4_data2", "dropless/all_to_all"),
                                            ("expert8", "dropless/ring")])
def test_expert_parallel_flops_with_average_buffers(mesh_name, mode):
  """With ep_capacity_factor 1 the buffers hold the average load: the split is as even as
  data parallelism's. (Factor 0 sizes them for the worst case: EP * min(K, E/EP) / K times
  the expert rows, see moejax/moe/dispatch/expert_parallel.py.)"""
  one = _one_device("dropless")
  _, _, flops = _compile(_step_config(mode, MESHES[mesh_name], factor=1.0), 8)
  assert flops * 8 <= FLOPS_BOUND * one["flops"], flops * 8 / one["flops"]


def test_balance_statistics_per_device_or_global():
  """model.moe.lb_loss_scope: "global_batch" is the one-device loss on any mesh (checked above);
  "micro_batch" is the mean of the loss each of the 8 batch shards computes from its own tokens."""
  x, ids, cot = _inputs()
  model = _layer_model("dropless", **{"moe.lb_loss_scope": "micro_batch"})
  layer = _layer(model, _mesh(MESHES["data8"]))
  spec = NamedSharding(layer.plan.mesh, P("data"))
  out = _layer_outputs(*nnx.split(layer), *(jax.device_put(a, spec) for a in (x, ids, cot)))
  got = float(out[2]["lb_loss"])
  x64 = np.asarray(x, np.float64).reshape(8, -1, D)          # the 8 shards' tokens
  gate = np.asarray(layer.router.gate[...], np.float64)
  e, k = 8, 2
  per_shard = []
  for xs in x64:
    idx, _, probs, _ = ref.route(xs @ gate, "topk", k)
    f = np.bincount(idx.ravel(), minlength=e) / idx.size
    per_shard.append(e * np.sum(f * probs.mean(0)))
  np.testing.assert_allclose(got, np.mean(per_shard), rtol=1e-5)
  idx, _, probs, _ = ref.route(x64.reshape(-1, D) @ gate, "topk", k)
  f = np.bincount(idx.ravel(), minlength=e) / idx.size
  assert abs(got - e * np.sum(f * probs.mean(0))) > 1e-4   # the two scopes differ here
