"""Parameters that carry logical axis names (see moejax.sharding).

Every weight is made here, so the metadata `moejax.sharding.state_shardings` reads is set in one
place. `eager_sharding=False`: the model is built without a mesh; the trainer places it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def logical_param(rngs: nnx.Rngs, shape: tuple[int, ...], stddev: float,
                  names: tuple[str, ...], dtype=jnp.float32) -> nnx.Param:
  """A normal(0, stddev) weight of `shape` with logical axis `names`, one per dimension."""
  init = nnx.initializers.normal(stddev=stddev)
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


def ones_param(shape: tuple[int, ...], names: tuple[str, ...], dtype=jnp.float32) -> nnx.Param:
  """A weight of ones (a norm scale) with logical axis `names`."""
  return nnx.Param(jnp.ones(shape, dtype), out_sharding=names, eager_sharding=False)


def zeros_param(shape: tuple[int, ...], names: tuple[str, ...], dtype=jnp.float32) -> nnx.Param:
  """A weight of zeros (a bias) with logical axis `names`."""
  return nnx.Param(jnp.zeros(shape, dtype), out_sharding=names, eager_sharding=False)


def side_rngs(rngs: nnx.Rngs, salt: int) -> nnx.Rngs:
  """A `params` stream of its own for optional parameters (a model variant's), derived from
  `rngs`' params stream at its current position without advancing it: the parameters drawn
  from `rngs` afterwards (the next blocks') are the same whether the option is on or off, so
  runs with and without it start from the same plain weights. `salt` tells apart the side
  streams taken at one position."""
  stream = rngs.params
  key = jax.random.fold_in(jax.random.fold_in(stream.key[...], stream.count[...]), salt)
  return nnx.Rngs(params=key)
