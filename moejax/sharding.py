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
}


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """Axis sizes with the one -1 axis (if any) filled so the product is `num_devices`; without a
  -1 axis the product may be smaller (a run on part of the devices)."""
  sizes = {a: int(mesh_config[a]) for a in MESH_AXES}
  known = math.prod(v for v in sizes.values() if v != -1)
  if -1 in sizes.values():
    if num_devices % known:
      raise ValueError(f"mesh: sizes {sizes} cannot fill {num_devices} devices "
                       f"({num_devices} is not a multiple of {known})")
    sizes = {a: (num_devices // known if v == -1 else v) for a, v in sizes.items()}
  if math.prod(sizes.values()) > num_devices:
    raise ValueError(f"mesh: sizes {sizes} need {math.prod(sizes.values())} devices, "
                     f"only {num_devices} are present")
  return sizes


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """A `Mesh` with axes `MESH_AXES` sized by `mesh_config` over the first devices of `devices`
  (default: all); a -1 axis takes all that remain."""
  devices = jax.devices() if devices is None else devices
  sizes = mesh_shape(mesh_config, len(devices))
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
