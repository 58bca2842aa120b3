"""Config validation and derived sizes.

`validate` runs before anything is traced, so a bad command-line override fails in
milliseconds with one error that names the field, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import ml_collections

_DTYPES = ("float32", "bfloat16", "float16")



class ConfigError(ValueError):
  """A config field holds a value outside what is allowed.

  Attributes:
    field: dotted path of the field, e.g. `model.moe.top_k`.
    value: the offending value.
    allowed: what would have been accepted, in words.
  """

  def __init__(self, field: str, value: Any, allowed: str):
    self.field, self.value, self.allowed = field, value, allowed
    super().__init__(f"config field `{field}` = {value!r} is not allowed: expected {allowed}")


@dataclasses.dataclass(frozen=True)
class MoEDims:
  """Expert counts and widths after fine-grained segmentation.

  Granularity G splits each of E experts of width F into G experts of width F/G and routes each
  token to K*G of them, keeping active FLOPs fixed ("Scaling Laws for Fine-Grained Mixture of
  Experts", Krajewski et al. 2024, arXiv:2402.07871). Shared experts follow DeepSeekMoE
  (arXiv:2401.06066): always-on experts of the same fine-grained width.
  """
  num_experts: int     # E*G
  top_k: int           # K*G
  expert_width: int    # F/G
  shared_width: int    # num_shared_experts * F/G (0: none)


def moe_dims(model: ml_collections.ConfigDict) -> MoEDims:
  """Derived MoE sizes of `model` (the `config.model` subtree); see `MoEDims`."""
  moe = model.moe
  g = moe.granularity
  width = model.d_ff // g
  return MoEDims(num_experts=moe.num_experts * g, top_k=moe.top_k * g, expert_width=width,
                 shared_width=moe.num_shared_experts * width)


def is_moe_layer(model: ml_collections.ConfigDict, layer: int) -> bool:
  """Whether 0-based `layer` has an MoE FFN: every `moe_every`-th layer, none when 0."""
  return model.moe_every > 0 and (layer + 1) % model.moe_every == 0


def _check(ok: bool, field: str, value: Any, allowed: str) -> None:
  if not ok:
    raise ConfigError(field, value, allowed)


def _positive_int(cfg, path: str) -> None:
  v = _get(cfg, path)
  _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, path, v, "an integer >= 1")


def _nonneg_int(cfg, path: str) -> None:
  v = _get(cfg, path)
  _check(isinstance(v, int) and not isinstance(v, bool) and v >= 0, path, v, "an integer >= 0")


def _get(cfg, path: str):
  node = cfg
  for part in path.split("."):
    if part not in node:
      raise ConfigError(path, None, "a value (the field is missing)")
    node = node[part]
  return node


def load_config_file(path: str, overrides=()) -> ml_collections.ConfigDict:
  """`get_config()` of the config file at `path` (e.g. configs/default.py; configs/ is not a
  package), with dotted-name `overrides` applied by `set_fields`."""
  import importlib.util  # noqa: PLC0415
  import os  # noqa: PLC0415
  name = "moejax_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r}: no such file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return set_fields(module.get_config(), overrides)


def set_fields(config: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
  """Sets dotted-name fields in place, e.g. {'model.moe.top_k': 1} (a dict or (name, value)
  pairs; what `--config.model.moe.top_k=1` does on the command line); returns `config`. A
  missing parent raises ConfigError naming it; a new leaf is added, as ConfigDict allows (e.g.
  a key of model.moe.router_args)."""
  items = overrides.items() if hasattr(overrides, "items") else overrides
  for name, value in items:
    *parents, leaf = name.split(".")
    node = _get(config, ".".join(parents)) if parents else config
    node[leaf] = value
  return config


# Router constructor arguments the layer supplies; the rest may come from model.moe.router_args.
_LAYER_SUPPLIED_ROUTER_ARGS = {"self", "d_model", "num_experts", "top_k", "rngs", "param_dtype"}


def validate_model(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks the `model` subtree alone (what building the model and counting its parameters
  need); returns it unchanged or raises `ConfigError` with `model.`-prefixed field names."""
  # Imported here: the registries live with their implementations.
  from flax import nnx
  from moejax.dispatch import DISPATCHERS
  from moejax.experts import FFN_FORMS
  from moejax.kernels import GMM_BACKENDS
  from moejax.routing import ROUTERS

  root, m, moe = {"model": model}, model, model.moe
  for f in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "d_ff", "max_len", "moe.num_experts", "moe.top_k", "moe.granularity",
            "moe.group_size"):
    _positive_int(root, f"model.{f}")
  for f in ("moe_every", "moe.num_shared_experts"):
    _nonneg_int(root, f"model.{f}")

  _check(m.d_model % m.num_heads == 0, "model.d_model", m.d_model,
         f"a multiple of model.num_heads={m.num_heads}")
  _check(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads", m.num_kv_heads,
         f"a divisor of model.num_heads={m.num_heads}")
  _check(m.head_dim % 2 == 0, "model.head_dim", m.head_dim, "an even integer (RoPE rotates pairs)")
  _check(m.dtype in _DTYPES, "model.dtype", m.dtype, f"one of {_DTYPES}")
  _check(m.param_dtype in _DTYPES, "model.param_dtype", m.param_dtype, f"one of {_DTYPES}")
  _check(m.moe_every <= m.num_layers, "model.moe_every", m.moe_every,
         f"0 (dense) or at most model.num_layers={m.num_layers}")
  _check(m.rope_theta > 0, "model.rope_theta", m.rope_theta, "a positive number")
  _check(moe.top_k <= moe.num_experts, "model.moe.top_k", moe.top_k,
         f"at most model.moe.num_experts={moe.num_experts}")
  _check(m.d_ff % moe.granularity == 0, "model.moe.granularity", moe.granularity,
         f"a divisor of model.d_ff={m.d_ff}")
  _check(moe.expert_type in FFN_FORMS, "model.moe.expert_type", moe.expert_type,
         f"one of {tuple(FFN_FORMS)}")
  _check(moe.router in ROUTERS, "model.moe.router", moe.router, f"one of {sorted(ROUTERS)}")
  router_args = set(inspect.signature(ROUTERS[moe.router].__init__).parameters)
  for key in moe.router_args:
    _check(key in router_args - _LAYER_SUPPLIED_ROUTER_ARGS, f"model.moe.router_args.{key}",
           moe.router_args[key], f"an argument of router {moe.router!r}: "
           f"{sorted(router_args - _LAYER_SUPPLIED_ROUTER_ARGS)}")
  # Build the router abstractly (no FLOPs, no compile) so its own argument checks, which raise
  # ConfigError, run now.
  dims = moe_dims(m)
  nnx.eval_shape(lambda: ROUTERS[moe.router](m.d_model, dims.num_experts, dims.top_k,
                                             rngs=nnx.Rngs(0), **moe.router_args))
  _check(moe.dispatch in DISPATCHERS, "model.moe.dispatch", moe.dispatch,
         f"one of {sorted(DISPATCHERS)}")
  _check(isinstance(moe.capacity_factor, (int, float)) and moe.capacity_factor > 0,
         "model.moe.capacity_factor", moe.capacity_factor, "a number > 0")
  _check(moe.gmm_backend in GMM_BACKENDS, "model.moe.gmm_backend", moe.gmm_backend,
         f"one of {sorted(GMM_BACKENDS)}")
  for f in ("lb_loss_weight", "z_loss_weight"):
    _check(moe[f] >= 0, f"model.moe.{f}", moe[f], "a number >= 0")
  return model


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every field of a moejax config; returns it unchanged or raises `ConfigError`."""
  from moejax.data import SOURCES, source_name
  from moejax.data.tokenizers import TOKENIZERS

  validate_model(config.model)
  m, moe, t = config.model, config.model.moe, config.train
  for f in ("train.steps", "train.batch_size", "train.seq_len", "train.eval_every",
            "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints",
            "train.log_every"):
    _positive_int(config, f)
  for f in ("seed", "train.warmup_steps"):
    _nonneg_int(config, f)
  _check(t.seq_len <= m.max_len, "train.seq_len", t.seq_len,
         f"at most model.max_len={m.max_len}")
  if moe.dispatch == "capacity":
    tokens = t.batch_size * t.seq_len
    _check(tokens % moe.group_size == 0, "model.moe.group_size", moe.group_size,
           f"a divisor of train.batch_size*train.seq_len={tokens}")
  _check(t.lr > 0, "train.lr", t.lr, "a number > 0")
  _check(t.warmup_steps <= t.steps, "train.warmup_steps", t.warmup_steps,
         f"at most train.steps={t.steps}")
  _check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "a number >= 0")
  _check(t.grad_clip > 0, "train.grad_clip", t.grad_clip, "a number > 0")

  _check(source_name(config.data.source) in SOURCES, "data.source", config.data.source,
         f"one of {sorted(SOURCES)} (tfds:<name>[/<config>], array_record:<glob>)")
  d = config.data
  if "tokenizer" in d:
    _check(d.tokenizer in TOKENIZERS, "data.tokenizer", d.tokenizer,
           f"one of {sorted(TOKENIZERS)}")
  if "packing_bins" in d:
    _positive_int(config, "data.packing_bins")
  if "worker_count" in d:
    _nonneg_int(config, "data.worker_count")
  if "pack" in d:
    _check(isinstance(d.pack, bool), "data.pack", d.pack, "True or False")

  sizes = {a: config.mesh[a] for a in ("data", "fsdp", "expert", "tensor")}
  for a, v in sizes.items():
    _check(isinstance(v, int) and (v >= 1 or v == -1), f"mesh.{a}", v, "an integer >= 1 or -1")
  _check(sum(v == -1 for v in sizes.values()) <= 1, "mesh", sizes, "at most one axis of size -1")
  return config
