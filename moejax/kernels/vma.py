"""Types of arrays inside `jax.shard_map`: which mesh axes an array varies over ("vma"), and the
casts and sums the kernels need so that their loops, Pallas calls and custom VJPs type-check
there (JAX's explicit-collectives types, "shard_map" docs; no paper).

Outside shard_map every set is empty and every function here is the identity.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def varying_axes(x: jax.Array) -> frozenset:
  """The shard_map mesh axes `x` varies over (empty outside shard_map). JAX has kept this set
  under two names: `typeof(x).mat.varying` (0.10+) and `typeof(x).vma` before."""
  aval = jax.typeof(x)
  mat = getattr(aval, "mat", None)
  return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def _union(arrays) -> frozenset:
  return frozenset().union(*(varying_axes(a) for a in arrays))


def _pcast(x: jax.Array, axes: frozenset) -> jax.Array:
  """x cast (a type change, no data moves) to vary over `axes` too."""
  missing = axes - varying_axes(x)
  return jax.lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x


def vary_alike(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  """The arrays, each cast to vary over every shard_map axis one of them varies over: a Pallas
  kernel's operands inside shard_map must agree."""
  axes = _union(arrays)
  return tuple(_pcast(a, axes) for a in arrays)


def varying_zeros(shape, dtype, *like: jax.Array) -> jax.Array:
  """Zeros that vary over every shard_map axis one of `like` varies over: a loop's initial
  carry must have the type of what its body makes of it."""
  return _pcast(jnp.zeros(shape, dtype), _union(like))


def out_struct(shape, dtype, *like: jax.Array) -> jax.ShapeDtypeStruct:
  """A kernel's output type: `shape`, `dtype`, varying over every shard_map axis one of the
  inputs `like` varies over (inside shard_map, pallas_call needs it said)."""
  axes = _union(like)
  if not axes:
    return jax.ShapeDtypeStruct(shape, dtype)
  return jax.ShapeDtypeStruct(shape, dtype,
                              manual_axis_type=jax.sharding.ManualAxisType(varying=axes))


def like_primal(ct: jax.Array, primal: jax.Array) -> jax.Array:
  """Sums a cotangent over the shard_map axes it varies over and its primal does not, as
  autodiff does when an invariant input meets varying ones (a custom VJP must do it itself)."""
  extra = varying_axes(ct) - varying_axes(primal)
  return jax.lax.psum(ct, tuple(sorted(extra))) if extra else ct
