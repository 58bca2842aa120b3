"""What the soft and retrieval layers share (`soft`, `smear`, `mot`, `peer`): a masked softmax,
their linear gate and expert bank, and the refusal of the sparse layer's router and bank
options, which these layers do not read (they route by themselves). Their usage metrics are
`moejax.moe.balance.usage_metrics` (`load` [E], each expert's share of the layer's expert usage,
and MaxVio); what "usage" is depends on the layer and is said in its docstring.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moejax.errors import ConfigError
from moejax.moe.dims import moe_dims
from moejax.moe.experts import ExpertBank
from moejax.moe.layer import VARIANT_DEFAULTS
from moejax.params import logical_param

# Far below any logit yet finite, so a fully masked softmax gives zeros, never 0/0 or inf - inf.
_MASKED = -1e30


def masked_softmax(logits: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
  """softmax over `axis` of the entries where `mask` (broadcast to `logits`) is True; masked
  entries get 0, and a slice with no entry left is all zeros. Float32."""
  mask = jnp.broadcast_to(mask, logits.shape)
  logits = jnp.where(mask, logits.astype(jnp.float32), _MASKED)
  e = jnp.exp(logits - jnp.max(logits, axis=axis, keepdims=True)) * mask
  total = jnp.sum(e, axis=axis, keepdims=True)
  return e / jnp.where(total > 0, total, 1.0)


def linear_gate(model: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Param:
  """A controller W [D, E] (E experts after granularity), normal(0, D^-1/2)."""
  d, e = model.d_model, moe_dims(model).experts
  return logical_param(rngs, (d, e), d ** -0.5, ("embed", "expert"),
                       jnp.dtype(model.param_dtype))


def expert_bank(model: ml_collections.ConfigDict, rngs: nnx.Rngs) -> ExpertBank:
  """The E experts of `model` (granularity applied, `moe_dims`) as one bank with a leading
  expert axis, as `MoELayer` builds it."""
  moe, dims = model.moe, moe_dims(model)
  return ExpertBank(dims.experts, model.d_model, dims.expert_width, moe.expert_type, rngs=rngs,
                    gmm_backend=moe.gmm_backend, dtype=jnp.dtype(model.dtype),
                    param_dtype=jnp.dtype(model.param_dtype))


# Options of the sparse layer (`moejax.moe.layer.MoELayer`) around its router and bank, with
# their defaults: a layer that routes by itself and builds its own experts takes none of them.
_SPARSE_LAYER_OPTIONS = {"router": "topk", "router_args": {}, "dispatch": "dropless",
                         "bias_update_rate": 0.0, **VARIANT_DEFAULTS}


def refuse_options(model: ml_collections.ConfigDict, options: dict, layer: str,
                   why: str = "") -> None:
  """Raises `ConfigError` for the first field of `options` ({field of model.moe: its default})
  set to anything but its default (a missing or empty field is the default): `layer` would
  silently ignore it. `why` ends the message."""
  for field, default in options.items():
    value = model.moe.get(field, default)
    if hasattr(value, "to_dict"):
      value = value.to_dict()
    if (value or default) != default:
      raise ConfigError(f"model.moe.{field}", value,
                        f"{default!r} (the default) with model.moe.layer={layer!r}{why}")


def refuse_router_options(model: ml_collections.ConfigDict, layer: str) -> None:
  """`refuse_options` for the sparse layer's router and bank options (another router, router
  arguments, loss-free balancing, capacity dispatch, null or extra experts, chains, gating
  residuals, expert widths), which a layer that routes by itself would ignore."""
  refuse_options(model, _SPARSE_LAYER_OPTIONS, layer, ", which routes by itself")


def check_int(model: ml_collections.ConfigDict, field: str, default: int, low: int,
              layer: str) -> int:
  """`model.moe.<field>` (default `default`) as an int >= `low`, else ConfigError."""
  value = model.moe.get(field, default)
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ConfigError(f"model.moe.{field}", value,
                      f"an integer >= {low} (model.moe.layer={layer!r})")
  return value
