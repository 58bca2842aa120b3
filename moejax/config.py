"""Config validation and derived sizes.

`validate` runs before anything is traced, so a bad command-line override fails in
milliseconds with one error that names the field, the value and what is allowed.
"""
from __future__ import annotations

import inspect
import json
import math
from typing import Any

import ml_collections

from moejax.errors import ConfigError
from moejax.moe.dims import is_moe_layer, moe_dims

_DTYPES = ("float32", "bfloat16", "float16")
_NAN_POLICIES = ("halt", "skip")


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
_LAYER_SUPPLIED_ROUTER_ARGS = {"self", "d_model", "num_experts", "top_k", "rngs", "param_dtype",
                               "vocab_size", "bias_update_rate"}


def router_arguments(router_cls) -> set[str]:
  """The `model.moe.router_args` a router takes: its named keyword arguments (its own and its
  base classes'), less those the layer supplies."""
  names = set()
  for cls in router_cls.__mro__:
    if "__init__" in vars(cls):
      names |= {n for n, p in inspect.signature(cls.__init__).parameters.items()
                if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
  return names - _LAYER_SUPPLIED_ROUTER_ARGS


def validate_model(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks the `model` subtree alone (what building the model and counting its parameters
  need); returns it unchanged or raises `ConfigError` with `model.`-prefixed field names."""
  from flax import nnx
  from moejax.moe import DISPATCHERS, EP_EXCHANGES, FFN_FORMS, GMM_BACKENDS, ROUTERS
  from moejax.moe.layer import LB_LOSS_SCOPES

  root, m, moe = {"model": model}, model, model.moe
  for f in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "d_ff", "max_len", "moe.num_experts", "moe.top_k", "moe.granularity",
            "moe.routing_group"):
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
  _check(_is_number(m.rope_theta) and m.rope_theta > 0, "model.rope_theta", m.rope_theta, "a positive number")
  _validate_model_options(m)
  _check(moe.top_k <= moe.num_experts, "model.moe.top_k", moe.top_k,
         f"at most model.moe.num_experts={moe.num_experts}")
  _check(m.d_ff % moe.granularity == 0, "model.moe.granularity", moe.granularity,
         f"a divisor of model.d_ff={m.d_ff}")
  FFN_FORMS.check(moe.expert_type)
  from moejax.moe.variants import MOE_LAYERS  # noqa: PLC0415
  MOE_LAYERS[moe.get("layer", "sparse")].check_config(m)
  ROUTERS.check(moe.router)
  router_args = router_arguments(ROUTERS[moe.router])
  for key in moe.router_args:
    _check(key in router_args, f"model.moe.router_args.{key}", moe.router_args[key],
           f"an argument of router {moe.router!r}: {sorted(router_args)}")
  # Build the router abstractly (no FLOPs, no compile) so its own argument checks, which raise
  # ConfigError, run now.
  dims = moe_dims(m)
  nnx.eval_shape(lambda: ROUTERS[moe.router](
      m.d_model, dims.experts, dims.experts_per_token, rngs=nnx.Rngs(0),
      vocab_size=m.vocab_size, bias_update_rate=moe.bias_update_rate, **moe.router_args))
  DISPATCHERS.check(moe.dispatch)
  EP_EXCHANGES.check(moe.ep_exchange)
  GMM_BACKENDS.check(moe.gmm_backend)
  fused = moe.get("fused_gather", False)
  _check(isinstance(fused, bool) and (not fused or moe.gmm_backend == "chunked"),
         "model.moe.fused_gather", fused, "True or False, and True only with "
         "model.moe.gmm_backend = 'chunked' (the fused gather follows chunked's walk over the "
         f"experts), not {moe.gmm_backend!r}")
  for f in ("capacity_factor", "ep_capacity_factor"):
    _check(_is_number(moe[f]) and (moe[f] > 0 or f == "ep_capacity_factor" and moe[f] == 0),
           f"model.moe.{f}", moe[f], "a number > 0" + (" (0: buffers for the worst case)"
                                                        if f == "ep_capacity_factor" else ""))
  _check(moe.lb_loss_scope in LB_LOSS_SCOPES, "model.moe.lb_loss_scope", moe.lb_loss_scope,
         f"one of {LB_LOSS_SCOPES}")
  _check(moe.dispatch in ROUTERS[moe.router].dispatch_modes, "model.moe.dispatch", moe.dispatch,
         f"one of {ROUTERS[moe.router].dispatch_modes} for router {moe.router!r}")
  for f in ("lb_loss_weight", "z_loss_weight"):
    _check(_is_number(moe[f]) and moe[f] >= 0, f"model.moe.{f}", moe[f], "a number >= 0")
  return model


def _validate_model_options(m: ml_collections.ConfigDict) -> None:
  """The options released MoE families need (moejax.interop.hf); each default keeps the plain
  moejax model. Missing fields take their default (configs written before they existed)."""
  from moejax.model import ATTENTIONS, QK_NORMS  # noqa: PLC0415
  get = lambda f, default: m.get(f, default)
  eps = get("norm_eps", 1e-6)
  _check(_is_number(eps) and eps > 0, "model.norm_eps", eps, "a number > 0")
  for f in ("qkv_bias", "tie_embeddings"):
    _check(isinstance(get(f, False), bool), f"model.{f}", get(f, False), "True or False")
  _check(get("qk_norm", "") in QK_NORMS, "model.qk_norm", get("qk_norm", ""),
         f"one of {QK_NORMS}")
  attention = get("attention", "mha")
  _check(attention in ATTENTIONS, "model.attention", attention, f"one of {ATTENTIONS}")
  if attention == "mla":
    root = {"model": m}
    for f in ("kv_lora_rank", "rope_head_dim", "v_head_dim"):
      _positive_int(root, f"model.mla.{f}")
    _nonneg_int(root, "model.mla.q_lora_rank")
    r = m.mla.rope_head_dim
    _check(r % 2 == 0 and r < m.head_dim, "model.mla.rope_head_dim", r,
           f"an even integer below model.head_dim={m.head_dim} (the q/k head width, RoPE part "
           "included)")
    for f, default in (("qkv_bias", False), ("qk_norm", "")):
      _check(get(f, default) == default, f"model.{f}", get(f, default),
             f"{default!r} with model.attention='mla' (MLA has its own latent norms)")
  root = {"model": {"dense_d_ff": get("dense_d_ff", 0),
                    "first_dense_layers": get("first_dense_layers", 0)}}
  _nonneg_int(root, "model.dense_d_ff")
  _nonneg_int(root, "model.first_dense_layers")
  _check(get("first_dense_layers", 0) <= m.num_layers, "model.first_dense_layers",
         get("first_dense_layers", 0), f"at most model.num_layers={m.num_layers}")
  dense = get("dense_layers", ())
  _check(isinstance(dense, (tuple, list)) and all(
      isinstance(i, int) and not isinstance(i, bool) and 0 <= i < m.num_layers for i in dense),
         "model.dense_layers", dense, f"a tuple of layer indices in [0, {m.num_layers})")
  gate = m.moe.get("shared_expert_gate", False)
  _check(isinstance(gate, bool) and (not gate or m.moe.num_shared_experts > 0),
         "model.moe.shared_expert_gate", gate,
         "True or False; True needs model.moe.num_shared_experts > 0")
  _validate_mod(m)


def _validate_mod(m: ml_collections.ConfigDict) -> None:
  """Mixture-of-Depths (moejax.moe.depth, arXiv:2404.02258): `model.mod_capacity` (0 or 1: off),
  `model.mod_every`, `model.mod_aux_loss_weight`; missing fields take their defaults."""
  c, every = m.get("mod_capacity", 0.0), m.get("mod_every", 2)
  weight = m.get("mod_aux_loss_weight", 0.01)
  _check(_is_number(c) and 0 <= c <= 1, "model.mod_capacity", c,
         "a fraction in (0, 1) of each sequence that routed blocks process (0 or 1: off)")
  _check(isinstance(every, int) and not isinstance(every, bool) and every >= 1,
         "model.mod_every", every, "an integer >= 1")
  _check(_is_number(weight) and weight >= 0, "model.mod_aux_loss_weight", weight,
         "a number >= 0")
  if 0 < c < 1:
    _check(every <= m.num_layers, "model.mod_every", every,
           f"at most model.num_layers={m.num_layers} with model.mod_capacity={c} (so that a "
           "block routes)")
    _check(m.moe.get("layer", "sparse") != "multi_head", "model.moe.layer", "multi_head",
           f"another layer with model.mod_capacity={c} (MH-MoE's routing state has a row per "
           "sub-token, which a routed block does not gather)")
    _check(m.moe.dispatch == "dropless", "model.moe.dispatch", m.moe.dispatch,
           f"'dropless' with model.mod_capacity={c} (capacity dispatch's routing groups would "
           "have to divide the tokens a routed block keeps)")


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Configs already checked, by content: `validate` runs once per run however many entry points
# (main, train_and_evaluate, Trainer) hand it the same config.
_VALIDATED: set[tuple[str, int]] = set()


def validate(config: ml_collections.ConfigDict,
             num_devices: int | None = None) -> ml_collections.ConfigDict:
  """Checks every field of a moejax config; returns it unchanged or raises `ConfigError`.

  `num_devices`: the devices the run uses (default: all of `jax.devices()`), for the mesh
  checks. Runs once per distinct config content.
  """
  if num_devices is None:
    import jax  # noqa: PLC0415
    num_devices = jax.device_count()
  key = (config.to_json_best_effort(sort_keys=True), num_devices)
  if key in _VALIDATED:
    return config
  _validate(config, num_devices)
  _VALIDATED.add(key)
  return config


def _validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  from moejax.data import SOURCES, source_name
  from moejax.data.tokenizers import TOKENIZERS
  from moejax.sharding import resolve_mesh

  validate_model(config.model)
  m, moe, t = config.model, config.model.moe, config.train
  for f in ("train.steps", "train.batch_size", "train.seq_len", "train.eval_every",
            "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints",
            "train.log_every", "train.max_skipped_steps", "train.preemption_check_every",
            "train.heartbeat_timeout_s"):
    _positive_int(config, f)
  for f in ("seed", "train.warmup_steps"):
    _nonneg_int(config, f)
  _check(t.seq_len <= m.max_len, "train.seq_len", t.seq_len,
         f"at most model.max_len={m.max_len}")
  _check(_is_number(t.lr) and t.lr > 0, "train.lr", t.lr, "a number > 0")
  _check(t.warmup_steps <= t.steps, "train.warmup_steps", t.warmup_steps,
         f"at most train.steps={t.steps}")
  _check(_is_number(t.weight_decay) and t.weight_decay >= 0, "train.weight_decay",
         t.weight_decay, "a number >= 0")
  _check(_is_number(t.grad_clip) and t.grad_clip > 0, "train.grad_clip", t.grad_clip,
         "a number > 0")
  # Fault handling (moejax/faults.py).
  nan_policy = _get(config, "train.nan_policy")
  _check(isinstance(nan_policy, str) and nan_policy in _NAN_POLICIES, "train.nan_policy",
         nan_policy, f"one of {_NAN_POLICIES}")

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
  if moe.get("layer", "sparse") == "mot":
    # Mixture of Tokens mixes the same position of several rows: causal only when the rows are
    # independent sequences. The text and Grain sources continue a document in the next row.
    _check(source_name(config.data.source) == "synthetic", "data.source", config.data.source,
           "'synthetic' with model.moe.layer='mot' (rows of the other sources continue one "
           "another's documents, so mixing them would leak later tokens into earlier ones)")
  _validate_mesh(config, resolve_mesh(config.mesh, num_devices, moe_dims(m).experts))


def _validate_mesh(config: ml_collections.ConfigDict, sizes: dict[str, int]) -> None:
  """The mesh against the model and the batch (sizes from `sharding.resolve_mesh`, which has
  checked them against the devices)."""
  m, moe, t = config.model, config.model.moe, config.train
  dims = moe_dims(m)
  ep, tp = sizes["expert"], sizes["tensor"]
  _check(ep <= dims.experts and dims.experts % ep == 0, "mesh.expert", ep,
         f"a divisor of the {dims.experts} experts (model.moe.num_experts * granularity)")
  _check(ep == 1 or not moe.get("fused_gather", False), "mesh.expert", ep,
         "1 with model.moe.fused_gather = True (expert-parallel exchanges move rows, not indices)")
  import jax  # noqa: PLC0415
  devices = math.prod(sizes[a] for a in ("data", "fsdp", "expert", "tensor"))
  _check(moe.gmm_backend != "pallas" or devices == 1 or jax.default_backend() != "cpu",
         "model.moe.gmm_backend", moe.gmm_backend,
         f"not 'pallas' on a mesh of {devices} CPU devices: inside shard_map the Pallas "
         "interpreter of jax 0.10.2 fails its varying-axes check; 'chunked' or 'blocked' there")
  widths = tuple(moe.get("expert_widths", ()) or ())
  width = max(widths) if widths else dims.expert_width
  _check(width % tp == 0, "mesh.tensor", tp,
         f"a divisor of the expert width {width} ("
         + ("the widest of model.moe.expert_widths" if widths else "model.d_ff / granularity")
         + ")")
  shards = sizes["data"] * sizes["fsdp"] * ep
  _check(t.batch_size % shards == 0, "train.batch_size", t.batch_size,
         f"a multiple of mesh.data * mesh.fsdp * mesh.expert = {shards} (the batch is split "
         "over them)")
  if moe.dispatch == "capacity":
    # Capacity dispatch splits the tokens over `tensor` too (DispatchPlan.token_axes).
    tokens = t.batch_size * t.seq_len // (shards * tp)
    _check(tokens % moe.routing_group == 0, "model.moe.routing_group", moe.routing_group,
           f"a divisor of the {tokens} tokens on each device (train.batch_size * train.seq_len "
           f"/ {shards * tp} devices): routing groups never straddle devices")
