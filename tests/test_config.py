"""Config validation: every bad value fails before tracing with an error naming its field."""
import glob
import os

import jax
import pytest
from flax import nnx

from moejax.config import validate
from moejax.errors import ConfigError
from moejax.moe import moe_dims
from moejax.model import Transformer

from helpers import ROOT, load_config

# (field, bad value, extra fields needed to reach the check, field the error must name)
BAD = [
    ("model.moe.num_experts", 0, {}, "model.moe.num_experts"),
    ("model.moe.num_experts", -3, {}, "model.moe.num_experts"),
    ("model.moe.top_k", 9, {}, "model.moe.top_k"),
    ("model.moe.top_k", 0, {}, "model.moe.top_k"),
    ("model.moe.capacity_factor", 0.0, {}, "model.moe.capacity_factor"),
    ("model.moe.capacity_factor", -1.0, {}, "model.moe.capacity_factor"),
    ("model.moe.router", "nope", {}, "model.moe.router"),
    ("model.moe.dispatch", "drop_everything", {}, "model.moe.dispatch"),
    ("model.moe.expert_type", "relu6", {}, "model.moe.expert_type"),
    ("model.moe.gmm_backend", "cuda_magic", {}, "model.moe.gmm_backend"),
    ("model.moe.granularity", 3, {}, "model.moe.granularity"),        # 128 % 3 != 0
    ("model.moe.lb_loss_weight", -0.1, {}, "model.moe.lb_loss_weight"),
    ("model.moe.routing_group", 100, {"model.moe.dispatch": "capacity"}, "model.moe.routing_group"),
    ("model.moe.router_args.softmax_order", "sideways", {}, "model.moe.router_args.softmax_order"),
    ("model.moe.router_args.jitter_noise", 1.5, {"model.moe.router": "switch",
                                                 "model.moe.top_k": 1},
     "model.moe.router_args.jitter_noise"),
    ("model.moe.router_args.temperature", 2.0, {}, "model.moe.router_args.temperature"),
    ("model.moe.router", "switch", {}, "model.moe.top_k"),             # switch is top-1
    ("model.d_model", 66, {}, "model.d_model"),                       # not divisible by 4 heads
    ("model.num_kv_heads", 3, {}, "model.num_kv_heads"),
    ("model.head_dim", 31, {}, "model.head_dim"),
    ("model.dtype", "float8", {}, "model.dtype"),
    ("model.moe_every", 5, {}, "model.moe_every"),
    ("model.vocab_size", 0, {}, "model.vocab_size"),
    ("train.seq_len", 256, {}, "train.seq_len"),                       # > max_len 128
    ("train.steps", 0, {}, "train.steps"),
    ("train.batch_size", 2.5, {}, "train.batch_size"),
    ("train.lr", 0.0, {}, "train.lr"),
    ("train.grad_clip", 0.0, {}, "train.grad_clip"),
    ("train.warmup_steps", 10_000, {}, "train.warmup_steps"),
    ("data.source", "imagenet", {}, "data.source"),
    ("mesh.expert", 0, {}, "mesh.expert"),
    ("model.moe.fused_gather", True, {}, "model.moe.fused_gather"),     # blocked has no fused form
    ("model.moe.fused_gather", "yes", {"model.moe.gmm_backend": "chunked"},
     "model.moe.fused_gather"),
    ("mesh.expert", 2, {"model.moe.gmm_backend": "chunked", "model.moe.fused_gather": True},
     "mesh.expert"),
    ("model.moe.gmm_backend", "pallas", {}, "model.moe.gmm_backend"),   # 8 CPU devices
    ("seed", -1, {}, "seed"),
]


def _set(config, path, value):
  *parents, leaf = path.split(".")
  node = config
  for p in parents:
    node = node[p]
  with node.ignore_type():
    node[leaf] = value


@pytest.mark.parametrize("field,value,extra,named", BAD, ids=[f"{b[0]}={b[1]}" for b in BAD])
def test_bad_value_names_its_field(field, value, extra, named):
  config = load_config()
  for f, v in extra.items():
    _set(config, f, v)
  validate(config)                       # the extra fields alone are fine
  _set(config, field, value)
  with pytest.raises(ConfigError) as err:
    validate(config)
  assert err.value.field == named
  message = str(err.value)
  assert named in message and repr(value)[:8] in message and "expected" in message


def test_two_minus_one_mesh_axes_rejected():
  config = load_config()
  config.mesh.fsdp = -1
  with pytest.raises(ConfigError, match="at most one axis of size -1"):
    validate(config)


CONFIGS = sorted(os.path.splitext(os.path.basename(p))[0]
                 for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_validates_and_builds(name):
  config = validate(load_config(name))
  model = nnx.eval_shape(lambda: Transformer(config.model, rngs=nnx.Rngs(0)))
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n_params > 0


def _ffn_active_width(config):
  """FFN hidden units a token passes through in one MoE layer (or the dense FFN)."""
  m = config.model
  if m.moe_every == 0:
    return m.d_ff
  d = moe_dims(m)
  return d.experts_per_token * d.expert_width + d.shared_width


def test_dense_baseline_matches_default_active_ffn_width():
  assert _ffn_active_width(load_config("dense")) == _ffn_active_width(load_config("default"))


def test_fine_grained_dims():
  m = load_config("fine_grained").model
  d = moe_dims(m)
  assert (d.experts, d.experts_per_token, d.expert_width) == (64, 8, m.d_ff // 8)
  assert d.shared_width == m.d_ff // 8
