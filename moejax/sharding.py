"""The device mesh and the logical-axis rules that map parameters and activations onto it.

Logical axis names on parameters (`vocab, embed, heads, kv_heads, head_dim, mlp, expert,
expert_mlp`) and activations (`batch, length, act_embed`) are mapped by one rules table onto the
mesh axes `data, fsdp, expert, tensor` (the scheme of GSPMD, Xu et al. 2021, arXiv:2105.04663,
as used by T5X/MaxText). Presets swap the table, never the model.
"""
from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moejax.errors import ConfigError
from moejax.registry import Registry

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None: replicated)
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),
    "length": None,
    "act_embed": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "expert": "expert",
    "expert_mlp": "tensor",
    # Multi-head latent attention's latent widths (moejax.model.LatentAttention): small, kept
    # whole on every device.
    "q_lora": None,
    "kv_lora": None,
    # Small widths kept whole on every device: the GRU state H of the recurrent router
    # (moejax.moe.routing.rmoe) and the rank r of Autonomy-of-Experts' factorised expert
    # projection (moejax.moe.variants.aoe).
    "router_hidden": None,
    "expert_rank": None,
}


# mesh.preset -> the axis sizes it sets from the configured ones. The preset fixes which axes
# are used; the sizes a user still chooses are mesh.expert (EP) and mesh.tensor.
MESH_PRESETS = Registry("mesh.preset", {
    "data": lambda s: {"data": -1, "fsdp": 1, "expert": 1, "tensor": 1},
    "fsdp": lambda s: {"data": 1, "fsdp": -1, "expert": 1, "tensor": 1},
    "ep_data": lambda s: {"data": -1, "fsdp": 1, "expert": s["expert"], "tensor": 1},
    "ep_fsdp": lambda s: {"data": 1, "fsdp": -1, "expert": s["expert"], "tensor": 1},
    "ep_tensor": lambda s: {"data": -1, "fsdp": 1, "expert": s["expert"], "tensor": s["tensor"]},
})
# The axes whose size a preset takes from the config; each must be >= 2 under it.
_PRESET_CHOSEN_AXES = {"ep_data": ("expert",), "ep_fsdp": ("expert",),
                       "ep_tensor": ("expert", "tensor")}


def resolve_mesh(mesh_config: ml_collections.ConfigDict, num_devices: int,
                 num_experts: int | None = None) -> dict[str, int]:
  """Axis sizes {data, fsdp, expert, tensor} of `mesh_config` on `num_devices` devices.

  `mesh.preset` (if not "") sets the layout first (`MESH_PRESETS`). The one -1 axis (if any)
  takes the devices the others leave; without one the product may be smaller than the device
  count (the run uses the first devices). Raises ConfigError naming `mesh.<axis>`.
  """
  sizes = {}
  for a in MESH_AXES:
    v = mesh_config[a]
    if isinstance(v, bool) or not isinstance(v, int) or not (v >= 1 or v == -1):
      raise ConfigError(f"mesh.{a}", v, "an integer >= 1, or -1 (all remaining devices)")
    sizes[a] = v
  preset = mesh_config.get("preset", "")
  if preset:
    MESH_PRESETS.check(preset)
    for a in _PRESET_CHOSEN_AXES.get(preset, ()):
      if sizes[a] < 2:
        raise ConfigError(f"mesh.{a}", sizes[a], f"an integer >= 2 with mesh.preset={preset!r}")
    sizes = MESH_PRESETS[preset](sizes)
  if sum(v == -1 for v in sizes.values()) > 1:
    raise ConfigError("mesh", sizes, "at most one axis of size -1")
  known = math.prod(v for v in sizes.values() if v != -1)
  free = next((a for a, v in sizes.items() if v == -1), None)
  if free is not None:
    if num_devices % known:
      axis = next(a for a, v in sizes.items() if v > 1) if known > 1 else free
      raise ConfigError(f"mesh.{axis}", sizes[axis], f"sizes whose product divides the "
                        f"{num_devices} devices (mesh: {sizes})")
    sizes[free] = num_devices // known
  if math.prod(sizes.values()) > num_devices:
    axis = max(sizes, key=sizes.get)
    raise ConfigError(f"mesh.{axis}", sizes[axis], f"sizes whose product is at most the "
                      f"{num_devices} devices (mesh: {sizes})")
  if num_experts is not None and (sizes["expert"] > num_experts or num_experts % sizes["expert"]):
    raise ConfigError("mesh.expert", sizes["expert"],
                      f"a divisor of the {num_experts} experts (EP shards hold E/EP each)")
  return sizes


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """A `Mesh` with axes `MESH_AXES` sized by `mesh_config` (`resolve_mesh`) over the first
  devices of `devices` (default: all)."""
  devices = jax.devices() if devices is None else devices
  sizes = resolve_mesh(mesh_config, len(devices))
  used = devices[:math.prod(sizes.values())]
  return Mesh(np.asarray(used).reshape([sizes[a] for a in MESH_AXES]), MESH_AXES)


def logical_to_spec(names, rules=None, mesh: Mesh | None = None) -> P:
  """PartitionSpec for a tuple of logical axis names; mesh axes of size 1 are dropped, and a
  mesh axis is used at most once per array."""
  rules = DEFAULT_RULES if rules is None else rules
  used, spec = set(), []
  for name in names or ():
    target = rules.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape[a] > 1))
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules=None):
  """NamedShardings for every leaf of an nnx.State from its `out_sharding` logical names;
  leaves without names are replicated. Axes that do not divide the dimension are replicated."""
  def one(v):
    names = v.get_metadata("out_sharding", None) if isinstance(v, nnx.Variable) else None
    spec = logical_to_spec(names, rules, mesh)
    shape = v.shape if isinstance(v, nnx.Variable) else np.shape(v)
    fixed = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
      size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
      fixed.append(axes if dim % size == 0 else None)
    return NamedSharding(mesh, P(*fixed))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules=None) -> NamedSharding:
  """Sharding of a [B, S] batch array: batch over the data-parallel axes."""
  return NamedSharding(mesh, logical_to_spec(("batch", "length"), rules, mesh))
