"""Tests for moejax.upcycle: a sparse-upcycled MoE (renormalised top-2) gives the dense model's
logits before any step and resumes training from the upcycled weights at the dense run's data
position; non-FFN weights are copied bit for bit and every expert is the dense FFN; Drop-
Upcycling re-initialises exactly round(r F) intermediate indices per expert, the same in gate,
up and down, from the dense matrices' own mean and std; bad inputs fail with errors that name
the flag, the file or the config field.
"""
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moejax import checkpoint, data, train, upcycle
from moejax.errors import ConfigError
from moejax.model import Transformer

from helpers import ROOT, load_config

B, S, V = 8, 16, 32
_SMALL = {"model.vocab_size": V, "model.d_model": 16, "model.num_layers": 2,
          "model.num_heads": 2, "model.num_kv_heads": 2, "model.head_dim": 8,
          "model.d_ff": 32, "model.max_len": S, "train.seq_len": S, "train.batch_size": B,
          "train.steps": 2, "train.warmup_steps": 1, "train.eval_every": 2,
          "train.eval_batches": 1, "train.log_every": 1, "train.checkpoint_every": 2,
          "data.num_domains": 4, "data.branching": 2, "mesh.data": 1}
DENSE_STEP = 7


def _dense_config(**overrides):
  return load_config("dense", **{**_SMALL, **overrides})


def _moe_config(**overrides):
  """4 experts of the dense FFN's width (32), top-2 renormalised, every layer MoE."""
  return load_config("default", **{**_SMALL, "model.moe_every": 1, "model.moe.num_experts": 4,
                                   "model.moe.top_k": 2, "model.moe.router_args.renormalize": True,
                                   **overrides})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A dense workdir (random weights, norms included, saved at step 7 with data index 7) and its
  sparse upcycling; returns (dense config, dense params, MoE config, workdir, restored state)."""
  base = tmp_path_factory.mktemp("upcycle")
  dense_dir, out_dir = str(base / "dense"), str(base / "moe")
  dense = _dense_config()
  trainer = train.Trainer(dense)
  state = trainer.init_state()
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: np.asarray(p) + 0.1 * rng.standard_normal(p.shape).astype(
      p.dtype), jax.device_get(state["params"]))
  state["params"] = jax.device_put(params, trainer.param_shardings)
  with checkpoint.Checkpointer(os.path.join(dense_dir, "checkpoints"), keep=1, every=0) as c:
    c.save(DENSE_STEP, state, {"data": {"index": DENSE_STEP}}, force=True)
  train._write_config(dense, dense_dir)
  moe = _moe_config()
  record = upcycle.upcycle(dense_dir, moe, out_dir)
  moe_trainer = train.Trainer(moe)
  with checkpoint.Checkpointer(os.path.join(out_dir, "checkpoints"), keep=1, every=0) as c:
    restored = c.restore(abstract_state=moe_trainer.abstract_state())
  return dense, params, moe, out_dir, restored, record, moe_trainer


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, params, inputs):
  return nnx.merge(graphdef, params)(inputs)[0]


def _forward(config, params, inputs):
  """Logits [B, S, V] of `config`'s model with `params` (a pure dict)."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(config.model, rngs=nnx.Rngs(0))))
  return np.asarray(_apply(graphdef, params, jnp.asarray(inputs)))


def _batch(config, index):
  source = data.make_source(config, "train")
  source.set_state({"index": index})
  return source.next()


def test_sparse_upcycled_logits_equal_dense(runs):
  dense, dense_params, moe, _, (step, state, extra), _, _ = runs
  assert step == 0 and extra["data"] == {"index": DENSE_STEP}
  inputs = _batch(dense, 0)["inputs"]
  want = _forward(dense, dense_params, inputs)
  got = _forward(moe, jax.device_get(state["params"]), inputs)
  assert np.abs(want).max() > 1.0
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_weights_copied_bitwise_and_router_fresh(runs):
  _, dense_params, _, _, (_, state, _), _, moe_trainer = runs
  moe_params = jax.device_get(state["params"])
  flat = lambda t: {jax.tree_util.keystr(p): np.asarray(v)
                    for p, v in jax.tree_util.tree_leaves_with_path(t)}
  d, m = flat(dense_params), flat(moe_params)
  fresh = flat(jax.device_get(moe_trainer.init_state()["params"]))
  checked = 0
  for name, value in m.items():
    if "['router']" in name:
      np.testing.assert_array_equal(value, fresh[name])            # the MoE config's init
    elif "['experts']" in name:
      dense_name = name.replace("['experts']", "")
      for e in range(value.shape[0]):
        np.testing.assert_array_equal(value[e], d[dense_name])
      checked += 1
    else:
      np.testing.assert_array_equal(value, d[name])
      checked += 1
  assert checked == len(d)                                          # every dense weight placed
  # A fresh optimizer state: Adam's moments and step count all zero.
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state["opt_state"]))


def test_training_resumes_from_the_upcycled_state(runs):
  """`moejax.main`'s train_and_evaluate resumes at step 0: its first loss is the dense model's
  loss on the batch after the dense run's last (data index 7)."""
  dense, dense_params, moe, out_dir, _, record, _ = runs
  assert record["data"] == "continued" and record["from_step"] == DENSE_STEP
  summary = train.train_and_evaluate(moe, out_dir, progress=False)
  assert summary["step"] == moe.train.steps
  with open(os.path.join(out_dir, "metrics.jsonl")) as f:
    first = next(r for r in map(json.loads, f) if "train/loss" in r)
  assert first["step"] == 1
  batch = _batch(dense, DENSE_STEP)
  logits = _forward(dense, dense_params, batch["inputs"])
  weights = (batch["segment_ids"] > 0).astype(np.float32)
  xent = np.asarray(optax.softmax_cross_entropy_with_integer_labels(
      jnp.asarray(logits), jnp.asarray(batch["targets"])))
  np.testing.assert_allclose(first["train/loss"], (xent * weights).sum() / weights.sum(),
                             rtol=1e-5)


def _dense_ffn(rng, d=24, f=40):
  return {"gate": rng.normal(0.3, 2.0, (d, f)).astype(np.float32),
          "up": rng.normal(-0.5, 0.5, (d, f)).astype(np.float32),
          "down": rng.normal(0.1, 1.5, (f, d)).astype(np.float32)}


@pytest.mark.parametrize("rate,n", [(0.25, 10), (0.5, 20), (1.0, 40)])
def test_drop_upcycling_reinitialises_exactly_r_per_expert(rate, n):
  w = _dense_ffn(np.random.default_rng(1))
  experts, chosen = upcycle.drop_upcycle(w, 6, rate, np.random.default_rng(2))
  assert chosen.shape == (6, n)
  new = {k: [] for k in w}
  for e in range(6):
    differs = {"gate": np.any(experts["gate"][e] != w["gate"], axis=0),
               "up": np.any(experts["up"][e] != w["up"], axis=0),
               "down": np.any(experts["down"][e] != w["down"], axis=1)}
    for k, mask in differs.items():
      assert mask.sum() == n                                   # round(r F), exactly
      np.testing.assert_array_equal(np.flatnonzero(mask), chosen[e])   # same S_e everywhere
    keep = np.setdiff1d(np.arange(40), chosen[e])
    np.testing.assert_array_equal(experts["gate"][e][:, keep], w["gate"][:, keep])
    np.testing.assert_array_equal(experts["down"][e][keep], w["down"][keep])
    new["gate"].append(experts["gate"][e][:, chosen[e]].ravel())
    new["up"].append(experts["up"][e][:, chosen[e]].ravel())
    new["down"].append(experts["down"][e][chosen[e]].ravel())
  assert not np.array_equal(experts["up"][0], experts["up"][1])  # experts differ
  for k, values in new.items():                                # N(mean, std) of the dense matrix
    v = np.concatenate(values)
    se = w[k].std() / np.sqrt(v.size)
    assert abs(v.mean() - w[k].mean()) < 5 * se
    assert abs(v.std() / w[k].std() - 1) < 5 / np.sqrt(v.size) + 0.02


def test_upcycle_params_sources_and_errors():
  rng = np.random.default_rng(3)
  ffn = _dense_ffn(rng, 4, 6)
  dense = {"embed": rng.standard_normal((8, 4)), "blocks": {0: {"ffn": {"w": ffn}}}}
  moe_init = {"embed": np.zeros((8, 4)), "blocks": {0: {"ffn": {
      "router": {"gate": np.ones((4, 3))},
      "experts": {"w": {k: np.zeros((3,) + v.shape, v.dtype) for k, v in ffn.items()}}}}}}
  out = upcycle.upcycle_params(dense, moe_init, method="drop", drop_rate=0.5, seed=0)
  np.testing.assert_array_equal(out["embed"], dense["embed"])
  np.testing.assert_array_equal(out["blocks"][0]["ffn"]["router"]["gate"], np.ones((4, 3)))
  assert out["blocks"][0]["ffn"]["experts"]["w"]["down"].shape == (3, 6, 4)
  again = upcycle.upcycle_params(dense, moe_init, method="drop", drop_rate=0.5, seed=0)
  np.testing.assert_array_equal(again["blocks"][0]["ffn"]["experts"]["w"]["up"],
                                out["blocks"][0]["ffn"]["experts"]["w"]["up"])   # seeded
  with pytest.raises(ValueError, match="blocks.0.ffn.experts.w.up needs"):
    bad = {**moe_init, "blocks": {0: {"ffn": {"router": {}, "experts": {"w": {
        **moe_init["blocks"][0]["ffn"]["experts"]["w"], "up": np.zeros((3, 4, 5))}}}}}}
    upcycle.upcycle_params(dense, bad)
  with pytest.raises(ValueError, match=r"parameter head \(4, 8\): no dense weight"):
    upcycle.upcycle_params(dense, {**moe_init, "head": np.zeros((4, 8))})
  with pytest.raises(ValueError, match=r"no place in the MoE model: \['embed'\]"):
    upcycle.upcycle_params(dense, {"blocks": moe_init["blocks"]})
  # Chain-of-Experts routers and MoE++'s constant experts are new too: they keep their init.
  ffn_init = moe_init["blocks"][0]["ffn"]
  extra = {"chain_routers": {0: {"gate": np.full((4, 3), 2.0)}},
           "zero_experts": {"constant": np.full((1, 4), 3.0)}}
  out = upcycle.upcycle_params(dense, {**moe_init, "blocks": {0: {"ffn": {**ffn_init, **extra}}}})
  for name, tree in extra.items():
    np.testing.assert_array_equal(jax.tree.leaves(out["blocks"][0]["ffn"][name]),
                                  jax.tree.leaves(tree))
  with pytest.raises(ValueError, match="--drop_rate"):
    upcycle.upcycle_params(dense, moe_init, method="sparse", drop_rate=0.5)
  with pytest.raises(ValueError, match="--method"):
    upcycle.upcycle_params(dense, moe_init, method="copy")


@pytest.mark.parametrize("overrides,field", [
    ({"model.d_model": 32}, "model.d_model"),
    ({"model.d_ff": 64}, "model.d_ff"),
    ({"model.moe.granularity": 2}, "model.d_ff"),
    ({"model.moe.num_shared_experts": 1}, "model.moe.num_shared_experts"),
    ({"model.moe_every": 2, "model.dense_d_ff": 48}, "model.dense_d_ff"),
    ({"model.moe.expert_type": "gelu"}, "model.moe.expert_type"),
])
def test_incompatible_configs_name_the_field(overrides, field):
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    upcycle.check_compatible(_dense_config(), _moe_config(**overrides), "dense/config.json")
  with pytest.raises(ConfigError, match="dense/config.json: model.moe_every"):
    upcycle.check_compatible(_moe_config(), _moe_config(), "dense/config.json")


def test_bad_from_path_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"--from .*nowhere.*no such directory"):
    upcycle.upcycle(str(tmp_path / "nowhere"), _moe_config(), str(tmp_path / "out"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
    upcycle.upcycle(str(tmp_path / "empty"), _moe_config(), str(tmp_path / "out"))
  # The command line turns it into a usage error naming the flag, before anything compiles.
  proc = subprocess.run(
      [sys.executable, "-m", "moejax.upcycle", f"--from={tmp_path / 'nowhere'}",
       f"--config={os.path.join(ROOT, 'configs', 'default.py')}", f"--workdir={tmp_path / 'o'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode != 0
  assert "--from" in proc.stderr and "no such directory" in proc.stderr, proc.stderr[-2000:]
