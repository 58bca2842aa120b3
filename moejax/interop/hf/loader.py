"""Hugging Face MoE checkpoints in and out: config.json + *.safetensors <-> moejax model.

Reading streams: the model is built abstractly (`nnx.eval_shape`, no memory), and each moejax
parameter is made by `jax.make_array_from_callback` straight into its mesh sharding
(`moejax.sharding.state_shardings`); the callback reads only the checkpoint tensors of the
device's slice (for an expert bank, only that shard's experts), one tensor at a time, with
`safetensors.safe_open(..., framework="numpy")`. The host never holds more than one moejax
parameter. torch is never imported.

Writing (`save`) gathers one parameter at a time to the host and writes config.json and
model.safetensors (safetensors.numpy), which transformers loads.

Not a paper implementation: checkpoint plumbing (the families' modules cite their papers).
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
from typing import Any

import jax
import ml_collections
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: safetensors reads bf16 as it)
import numpy as np
from flax import nnx
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding

from moejax import sharding
from moejax.config import load_config_file, set_fields, validate_model
from moejax.interop.hf import deepseek_v3, mixtral, olmoe, qwen2_moe, qwen3_moe
from moejax.interop.hf.tables import Tensor, UnsupportedCheckpoint
from moejax.registry import Registry

# config.json `model_type` -> the family module (config translation and name table).
FAMILIES = Registry("config.json:model_type", {
    f.MODEL_TYPE: f for f in (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3)})

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))), "configs", "default.py")
INDEX = "model.safetensors.index.json"


class MissingTensorsError(KeyError):
  """The checkpoint lacks tensors the family's table needs (all of them are named)."""


def read_hf_config(hf_dir: str) -> dict:
  """config.json of `hf_dir` as a dict."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no config.json in the checkpoint folder {hf_dir!r}")
  with open(path) as f:
    return json.load(f)


def family(hf: dict):
  """The family module of a config.json (refuses unknown model types, naming those known)."""
  if hf.get("model_type") not in FAMILIES:
    raise UnsupportedCheckpoint("model_type", hf.get("model_type"),
                                f"one of {sorted(FAMILIES)}")
  return FAMILIES[hf["model_type"]]


def moejax_config(hf: dict, base_config: str = DEFAULT_CONFIG,
                  overrides=()) -> ml_collections.ConfigDict:
  """The moejax config of a config.json: `base_config` (default configs/default.py) with the
  family's model fields, then `overrides` (dotted names). Keeps config.json as `hf_config` (a
  JSON string) so `save` writes back the fields moejax does not model (token ids, ...)."""
  fields = family(hf).to_moejax(hf)
  config = set_fields(load_config_file(base_config), fields)
  config.hf_config = json.dumps(hf, sort_keys=True)
  set_fields(config, overrides)
  validate_model(config.model)
  return config


class CheckpointReader:
  """The tensors of a local safetensors checkpoint: one `*.safetensors` file, several, or
  shards listed in model.safetensors.index.json. Tensors are read one at a time as numpy."""

  def __init__(self, hf_dir: str):
    from safetensors import safe_open  # noqa: PLC0415
    self._safe_open = safe_open
    index = os.path.join(hf_dir, INDEX)
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      self.files = {name: os.path.join(hf_dir, file) for name, file in weight_map.items()}
    else:
      paths = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
      if not paths:
        raise FileNotFoundError(f"{hf_dir!r}: no *.safetensors files (and no {INDEX})")
      self.files = {}
      for p in paths:
        with safe_open(p, framework="numpy") as f:
          self.files.update({name: p for name in f.keys()})
    self._open: dict[str, Any] = {}

  def names(self) -> set[str]:
    return set(self.files)

  def read(self, name: str) -> np.ndarray:
    """One tensor as a numpy array (bfloat16 as ml_dtypes.bfloat16)."""
    path = self.files[name]
    if path not in self._open:
      self._open[path] = self._safe_open(path, framework="numpy").__enter__()
    return self._open[path].get_tensor(name)

  def close(self) -> None:
    for f in self._open.values():
      f.__exit__(None, None, None)
    self._open.clear()


@dataclasses.dataclass
class LoadReport:
  """What `load` did with the checkpoint: `unused` tensors (e.g. DeepSeek-V3's multi-token
  prediction layer) were not read; `tensors` were."""
  unused: list[str]
  tensors: int

  def __str__(self) -> str:
    more = f"; unused ({len(self.unused)}): {', '.join(self.unused[:20])}" + (
        " ..." if len(self.unused) > 20 else "") if self.unused else "; no unused tensors"
    return f"read {self.tensors} tensors{more}"


def _group(table: list[Tensor]) -> dict[tuple, list[Tensor]]:
  groups = collections.defaultdict(list)
  for t in table:
    groups[t.path].append(t)
  return groups


def load_params(reader: CheckpointReader, table: list[Tensor], abstract_state: nnx.State,
                shardings) -> tuple[dict, LoadReport]:
  """Reads the checkpoint into arrays shaped and sharded like `abstract_state`.

  Args:
    reader: the checkpoint.
    table: the family's `Tensor`s.
    abstract_state: `nnx.state` of the abstract model (shapes and dtypes).
    shardings: NamedSharding per leaf of `abstract_state` (a pure dict or nnx.State).
  Returns:
    (pure dict of jax.Arrays, LoadReport).
  Raises:
    MissingTensorsError naming every tensor the table needs and the checkpoint lacks;
    ValueError for a tensor whose shape does not fit its parameter, or a parameter no tensor
    fills (a bug of the table).
  """
  names = reader.names()
  missing = sorted({t.name for t in table} - names)
  if missing:
    raise MissingTensorsError(f"the checkpoint lacks {len(missing)} tensors the "
                              f"table needs: {', '.join(missing[:20])}" + (
                                  " ..." if len(missing) > 20 else ""))
  groups = _group(table)
  flat_abstract = traverse_util.flatten_dict(nnx.to_pure_dict(abstract_state))
  flat_shardings = traverse_util.flatten_dict(
      shardings if isinstance(shardings, dict) else nnx.to_pure_dict(shardings))
  unfilled = sorted(set(flat_abstract) - set(groups), key=str)
  extra = sorted(set(groups) - set(flat_abstract), key=str)
  if unfilled or extra:
    raise ValueError(f"the name table does not match the moejax model: parameters no tensor "
                     f"fills {unfilled}; table paths the model lacks {extra}")
  out = {}
  for p, leaf in flat_abstract.items():
    out[p] = _make_array(reader, groups[p], leaf.shape, leaf.dtype, flat_shardings[p])
  reader.close()
  used = {t.name for t in table}
  return (traverse_util.unflatten_dict(out),
          LoadReport(unused=sorted(names - used), tensors=len(used)))


def _make_array(reader: CheckpointReader, entries: list[Tensor], shape, dtype,
                target: NamedSharding) -> jax.Array:
  """One parameter from its checkpoint tensor(s), built shard by shard on its devices."""
  cache: dict[str, np.ndarray] = {}    # this parameter's tensors, read once for all devices

  def one(t: Tensor, want: tuple) -> np.ndarray:
    if t.name not in cache:
      w = reader.read(t.name)
      try:
        cache[t.name] = np.asarray(t.transform.load(w, want), dtype=dtype)
      except ValueError as e:
        raise ValueError(f"checkpoint tensor {t.name} of shape {tuple(w.shape)} does not fit "
                         f"moejax parameter {'.'.join(map(str, t.path))} of shape {shape}: "
                         f"{e}") from None
    return cache[t.name]

  experts = [t for t in entries if t.expert is not None]
  if experts:
    by_expert = {t.expert: t for t in experts}
    if sorted(by_expert) != list(range(shape[0])) or len(experts) != len(entries):
      raise ValueError(f"moejax parameter {entries[0].path}: the table gives experts "
                       f"{sorted(by_expert)} of {shape[0]}")

    def callback(index):
      rows = range(shape[0])[index[0]]
      return np.stack([one(by_expert[j], tuple(shape[1:])) for j in rows])[(slice(None),)
                                                                          + tuple(index[1:])]
  else:
    if len(entries) != 1:
      raise ValueError(f"moejax parameter {entries[0].path}: {len(entries)} tensors map to it")

    def callback(index):
      return one(entries[0], tuple(shape))[index]
  return jax.make_array_from_callback(tuple(shape), target, callback)


def single_device_mesh() -> Mesh:
  """A mesh of the first device, for loading without a mesh."""
  return Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1, 1), sharding.MESH_AXES)


def load(hf_dir: str, *, mesh: Mesh | None = None, config: ml_collections.ConfigDict | None = None,
         overrides=(), shardings=None):
  """Loads a Hugging Face MoE checkpoint folder into a moejax `Transformer`.

  Families: Mixtral (arXiv:2401.04088), Qwen2-MoE (arXiv:2407.10671), Qwen3-MoE
  (arXiv:2505.09388), OLMoE (arXiv:2409.02060), DeepSeek-V3 (arXiv:2412.19437).

  Args:
    hf_dir: folder with config.json and *.safetensors (optionally sharded, with an index).
    mesh: where the parameters go (sharded by `moejax.sharding` rules) and where the MoE layers
      run; None: the first device.
    config: the moejax config (default: `moejax_config(config.json)`, with `overrides`).
    shardings: per-parameter NamedShardings (a pure dict), e.g. `Trainer.param_shardings`;
      default: `state_shardings` of the model on `mesh`.
  Returns:
    (model, config, LoadReport).
  """
  hf = read_hf_config(hf_dir)
  fam = family(hf)
  config = moejax_config(hf, overrides=overrides) if config is None else config
  abstract = nnx.eval_shape(lambda: _transformer(config.model, mesh))
  graphdef, state = nnx.split(abstract)
  if shardings is None:
    shardings = sharding.state_shardings(state, mesh if mesh is not None else
                                         single_device_mesh())
  params, report = load_params(CheckpointReader(hf_dir), fam.table(config.model, hf), state,
                               shardings)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state), config, report


def _transformer(model_config, mesh):
  from moejax.model import Transformer  # noqa: PLC0415
  return Transformer(model_config, rngs=nnx.Rngs(0), mesh=mesh)


def save(params, config: ml_collections.ConfigDict, hf_dir: str, *,
         model_type: str | None = None) -> list[str]:
  """Writes moejax parameters as a Hugging Face checkpoint: config.json and model.safetensors.

  Args:
    params: pure dict of the model state (`nnx.to_pure_dict(nnx.state(model))`, or a train
      state's "params"); arrays may be sharded.
    config: the moejax config (its `hf_config`, from an import, supplies the config.json fields
      moejax does not model).
    model_type: the family (default: `hf_config`'s model_type).
  Returns:
    the tensor names written.
  """
  from safetensors.numpy import save_file  # noqa: PLC0415
  base = json.loads(config.get("hf_config", "{}") or "{}")
  model_type = model_type or base.get("model_type")
  if model_type is None:
    raise UnsupportedCheckpoint("model_type", None, f"a family to export as, one of "
                                f"{sorted(FAMILIES)} (pass model_type=)")
  fam = family({"model_type": model_type})
  m = config.model
  fam.check_model(m)
  hf = {**base, **fam.to_hf(m)}
  if base.get("model_type") != model_type:
    hf.pop("transformers_version", None)
  flat = traverse_util.flatten_dict(params)
  tensors = {}
  for t in fam.table(m, hf):
    p = flat[t.path]
    value = p[t.expert] if t.expert is not None else p
    # float32 whatever the parameter dtype (config.json says so).
    tensors[t.name] = np.ascontiguousarray(
        t.transform.save(np.asarray(jax.device_get(value)).astype(np.float32)))
  os.makedirs(hf_dir, exist_ok=True)
  with open(os.path.join(hf_dir, "config.json"), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  save_file(tensors, os.path.join(hf_dir, "model.safetensors"), metadata={"format": "pt"})
  return sorted(tensors)

