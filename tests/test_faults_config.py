"""Bad configs: hypothesis draws hundreds of invalid configs (wrong types, out-of-range numbers,
unknown names, inconsistent sizes, bad meshes), one fault each on a small valid config. Each
must be rejected by `moejax.config.validate` with a `ConfigError` naming the field, the value
and what is allowed, before anything is compiled; the valid neighbour of each case (the same
field at an allowed value) must pass, and a sample of neighbours trains a step.

Wrong types reach `validate` from config files written with them (ConfigDict checks types
only on later assignment), so the test sets them with `ignore_type`.
"""
import math

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from moejax import data
from moejax.config import validate
from moejax.errors import ConfigError
from moejax.train import Trainer

from test_train import tiny_config

# A small valid base: d_model 32, 2 heads (2 KV), head_dim 16, d_ff 64, 2 layers, max_len 32,
# 4 experts top-2, batch 8 x 32 on all 8 devices.
BASE = {"mesh.data": -1}

POSITIVE_INTS = ["model.vocab_size", "model.d_model", "model.num_layers", "model.num_heads",
                 "model.num_kv_heads", "model.head_dim", "model.d_ff", "model.max_len",
                 "model.moe.num_experts", "model.moe.top_k", "model.moe.granularity",
                 "model.moe.routing_group", "train.steps", "train.batch_size", "train.seq_len",
                 "train.eval_every", "train.eval_batches", "train.checkpoint_every",
                 "train.keep_checkpoints", "train.log_every", "train.max_skipped_steps",
                 "train.preemption_check_every", "train.heartbeat_timeout_s",
                 "data.packing_bins"]
NONNEG_INTS = ["seed", "train.warmup_steps", "model.moe_every", "model.moe.num_shared_experts",
               "data.worker_count"]
POSITIVE_NUMBERS = ["train.lr", "train.grad_clip", "model.rope_theta",
                    "model.moe.capacity_factor"]
NONNEG_NUMBERS = ["train.weight_decay", "model.moe.lb_loss_weight", "model.moe.z_loss_weight"]
NAMES = {"model.dtype": ["float32", "bfloat16"], "model.param_dtype": ["float32"],
         "model.moe.router": ["topk", "sigmoid"], "model.moe.dispatch": ["dropless", "capacity"],
         "model.moe.expert_type": ["swiglu"], "model.moe.gmm_backend": ["blocked", "ragged_dot"],
         "model.moe.ep_exchange": ["all_to_all", "ring"],
         "model.moe.lb_loss_scope": ["global_batch"], "data.source": ["synthetic"],
         "data.tokenizer": ["byte"], "train.nan_policy": ["halt", "skip"]}

WRONG_TYPES = st.one_of(st.text(max_size=4), st.none(), st.booleans(),
                        st.lists(st.integers(), max_size=2))
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])


def _leaf(config, dotted):
  *parents, leaf = dotted.split(".")
  node = config
  for p in parents:
    node = node[p]
  return node, leaf


def _set(config, dotted, value):
  node, leaf = _leaf(config, dotted)
  with node.ignore_type():
    node[leaf] = value


def _get(config, dotted):
  node, leaf = _leaf(config, dotted)
  return node[leaf]


@st.composite
def cases(draw):
  """(kind, [(field, bad value)], field named in the error, [(field, valid neighbour value)])."""
  kind = draw(st.sampled_from(["positive_int", "nonneg_int", "positive_number",
                               "nonneg_number", "name", "sizes", "mesh"]))
  if kind == "positive_int":
    f = draw(st.sampled_from(POSITIVE_INTS))
    bad = draw(st.one_of(st.integers(-10**6, 0), st.floats(0.5, 64.0), WRONG_TYPES))
    return kind, [(f, bad)], f, []
  if kind == "nonneg_int":
    f = draw(st.sampled_from(NONNEG_INTS))
    bad = draw(st.one_of(st.integers(-10**6, -1), st.floats(0.5, 8.0), WRONG_TYPES))
    return kind, [(f, bad)], f, []
  if kind in ("positive_number", "nonneg_number"):
    fields = POSITIVE_NUMBERS if kind == "positive_number" else NONNEG_NUMBERS
    f = draw(st.sampled_from(fields))
    low = st.floats(-1e6, 0.0) if kind == "positive_number" else st.floats(-1e6, -1e-9)
    # (A bool in a float field is stored as 0.0 or 1.0 by ConfigDict: not a wrong type here.)
    wrong = st.one_of(st.text(max_size=4), st.none(), st.lists(st.floats(), max_size=2))
    bad = draw(st.one_of(low, NON_FINITE, wrong))
    good = draw(st.floats(1e-6, 10.0))
    return kind, [(f, bad)], f, [(f, good)]
  if kind == "name":
    f = draw(st.sampled_from(sorted(NAMES)))
    bad = draw(st.one_of(st.text(min_size=1, max_size=12).filter(lambda s: s not in NAMES[f]
                                                                 and ":" not in s),
                         st.integers(), st.none()))
    return kind, [(f, bad)], f, [(f, draw(st.sampled_from(NAMES[f])))]
  if kind == "sizes":
    which = draw(st.sampled_from(["heads", "kv_heads", "head_dim", "moe_every", "top_k",
                                  "granularity", "seq_len", "warmup", "router_arg", "jitter"]))
    if which == "heads":      # d_model = 32 is not a multiple of them
      n = draw(st.sampled_from([3, 5, 6, 7, 9]))
      return kind, [("model.num_heads", n), ("model.num_kv_heads", 1)], "model.d_model", \
          [("model.num_heads", 4), ("model.num_kv_heads", 1)]
    if which == "kv_heads":   # not a divisor of 2 heads
      return kind, [("model.num_kv_heads", draw(st.integers(3, 64)))], "model.num_kv_heads", \
          [("model.num_kv_heads", 1)]
    if which == "head_dim":   # RoPE needs an even width
      return kind, [("model.head_dim", draw(st.integers(0, 40)) * 2 + 1)], "model.head_dim", \
          [("model.head_dim", 8)]
    if which == "moe_every":
      return kind, [("model.moe_every", draw(st.integers(3, 100)))], "model.moe_every", \
          [("model.moe_every", 2)]
    if which == "top_k":      # more than the 4 experts
      return kind, [("model.moe.top_k", draw(st.integers(5, 64)))], "model.moe.top_k", \
          [("model.moe.top_k", 4)]
    if which == "granularity":   # not a divisor of d_ff = 64
      g = draw(st.integers(3, 200).filter(lambda g: 64 % g))
      return kind, [("model.moe.granularity", g)], "model.moe.granularity", \
          [("model.moe.granularity", 2)]
    if which == "seq_len":    # longer than max_len = 32
      return kind, [("train.seq_len", draw(st.integers(33, 4096)))], "train.seq_len", \
          [("train.seq_len", 16)]
    if which == "warmup":     # longer than the 8 steps
      return kind, [("train.warmup_steps", draw(st.integers(9, 10**6)))], \
          "train.warmup_steps", [("train.warmup_steps", 8)]
    if which == "router_arg":
      key = draw(st.sampled_from(["jitter", "noise", "temperature", "top_k", "d_model"]))
      return kind, [(f"model.moe.router_args.{key}", 0.1)], f"model.moe.router_args.{key}", []
    jitter = draw(st.one_of(st.floats(1.0, 10.0), st.floats(-10.0, -1e-6)))
    return kind, [("model.moe.router", "switch"), ("model.moe.top_k", 1),
                  ("model.moe.router_args.jitter_noise", jitter)], \
        "model.moe.router_args.jitter_noise", \
        [("model.moe.router", "switch"), ("model.moe.top_k", 1),
         ("model.moe.router_args.jitter_noise", 0.01)]
  which = draw(st.sampled_from(["axis_type", "too_many", "two_free", "expert", "tensor",
                                "batch", "preset"]))
  axis = draw(st.sampled_from(["data", "fsdp", "expert", "tensor"]))
  if which == "axis_type":
    bad = draw(st.one_of(st.integers(-100, 0).filter(lambda v: v != -1), WRONG_TYPES))
    return kind, [(f"mesh.{axis}", bad)], f"mesh.{axis}", []
  if which == "too_many":     # more devices than the 8 there are
    n = draw(st.sampled_from([16, 32, 64]))
    return kind, [("mesh.data", 1), (f"mesh.{axis}", n)], f"mesh.{axis}", \
        [("mesh.data", 1), (f"mesh.{axis}", 1)]
  if which == "two_free":
    other = draw(st.sampled_from(["fsdp", "expert", "tensor"]))
    return kind, [(f"mesh.{other}", -1)], "mesh", [(f"mesh.{other}", 1)]
  if which == "expert":       # not a divisor of the 4 experts, or of the 8 devices
    return kind, [("mesh.expert", draw(st.sampled_from([3, 5, 8])))], "mesh.expert", \
        [("mesh.expert", 2)]
  if which == "tensor":       # 3 neither divides the 8 devices nor the expert width 64
    return kind, [("mesh.tensor", 3)], "mesh.tensor", [("mesh.tensor", 2)]
  if which == "batch":        # not split evenly over 8 data shards
    b = draw(st.integers(1, 100).filter(lambda b: b % 8))
    return kind, [("train.batch_size", b)], "train.batch_size", [("train.batch_size", 16)]
  return kind, [("mesh.preset", draw(st.sampled_from(["dp", "zero3", "ep", "tp"])))], \
      "mesh.preset", [("mesh.preset", "data")]


# XLA compilations seen. (validate builds the router with nnx.eval_shape, an abstract trace
# with no FLOPs, so its own argument checks run: that trace is allowed, a compile is not.)
_compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: _compiles.append(event) if "backend_compile" in event else None)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_invalid_configs_are_rejected_naming_field_value_and_allowed(case):
  kind, bad, field, good = case
  config = tiny_config(**BASE)
  for f, v in bad:
    _set(config, f, v)
  before = len(_compiles)
  with pytest.raises(ConfigError) as e:
    validate(config)
  assert len(_compiles) == before, _compiles[before:]   # nothing compiled on the way
  err = e.value
  assert err.field == field, (case, str(err))
  msg = str(err)
  assert f"`{field}`" in msg and "expected" in msg and err.allowed, msg
  if field == bad[-1][0]:   # the faulty field itself: its value is in the message
    v = _get(config, field)   # as stored (ConfigDict turns a bool in a float field to 0.0)
    assert (err.value is v or err.value == v or (isinstance(v, float) and math.isnan(v))), \
        (err.value, v)
    assert repr(v) in msg, (repr(v), msg)
  # The valid neighbour: the same fields at allowed values (or the base's) pass.
  neighbour = tiny_config(**BASE)
  for f, v in good:
    _set(neighbour, f, v)
  validate(neighbour)


# A neighbour touching many fields at once (mesh, granularity, top-k, NaN policy), built and
# stepped: the validator passes configs that run. (Switch with capacity dispatch trains in
# tests/test_train.py, grouped-query attention in tests/test_model.py.)
NEIGHBOURS = [
    {"mesh.data": 2, "mesh.expert": 2, "mesh.tensor": 2, "model.moe.granularity": 2,
     "model.moe.top_k": 4, "train.nan_policy": "skip"},
]


@pytest.mark.parametrize("overrides", NEIGHBOURS, ids=lambda o: ",".join(sorted(o)))
def test_valid_neighbours_train_a_step(overrides):
  config = tiny_config(**overrides)
  validate(config)
  trainer = Trainer(config)
  state, out = trainer.train_step(trainer.init_state(),
                                  trainer.put_batch(data.make_source(config, "train").next()))
  assert np.isfinite(float(out["train/loss"])) and int(state["step"]) == 1


@pytest.mark.parametrize("value", [None, "1e4", math.inf])
def test_rope_theta_of_a_wrong_type(value):
  """Found by the test above (a TypeError, and inf accepted), fixed in e25b789; kept as a
  regression test."""
  config = tiny_config(**BASE)
  _set(config, "model.rope_theta", value)
  with pytest.raises(ConfigError, match="model.rope_theta"):
    validate(config)
