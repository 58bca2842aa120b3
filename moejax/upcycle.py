"""A dense checkpoint made into an MoE checkpoint: sparse upcycling and Drop-Upcycling.

    python -m moejax.upcycle --from WORKDIR_DENSE --config MOE_CONFIG --workdir OUT \\
        [--method sparse|drop] [--drop_rate 0.5] [--seed N] [--config.x=y ...]
    python -m moejax.main --config MOE_CONFIG --workdir OUT        # trains the MoE from it

WORKDIR_DENSE is a workdir that `moejax.main` wrote with a dense config (e.g. configs/dense.py):
its `config.json` and the latest checkpoint of `checkpoints/` are read.

Sparse upcycling ("Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints",
Komatsuzaki et al. 2022, arXiv:2212.05055): every MoE layer's expert e is a copy of the dense
layer's FFN, W_e = W for W in {gate, up, down}; the router is new (the MoE config's
initialisation); every other weight (embedding, attention, norms, head, the dense layers the
MoE config keeps) is copied as it is. With a router whose top-k weights sum to 1 (top-k with
`renormalize=True`, softmax after the top-k, sigmoid) and no dropped copies, the upcycled
layer computes sum_k g_k FFN(x) = FFN(x): the MoE model starts as the dense model's function.

Drop-Upcycling ("Drop-Upcycling: Training Sparse Mixture of Experts with Partial
Re-initialization", Nakamura et al. 2025, arXiv:2502.19261): after the copy, each expert e
draws a set S_e of n = round(r F) of the F intermediate indices (uniformly, without
replacement) and re-initialises those columns of W_gate, W_up [D, F] and rows of W_down [F, D]:

    W_e[:, S_e] ~ N(mu_W, sigma_W^2)    (W_down: W_e[S_e, :]),

mu_W and sigma_W the mean and standard deviation of the dense matrix W itself (per matrix); the
same S_e in all three matrices of the expert. r = 0 is sparse upcycling.

What OUT holds: one checkpoint at step 0 in the MoE config's train-state layout
(`moejax.train.Trainer`), with the upcycled parameters, a fresh optimizer state (Adam moments
zero) and the MoE config's RNG. Step 0 and a fresh optimizer because the dense optimizer's
moments have no counterpart for the router and the wrong shape for the experts, and because
`train.steps` of the MoE config is then the budget of the continued training, with its own
warm-up (which the new router needs) and cosine decay. The data position continues from the
dense checkpoint when both configs' `data` sections are equal (the MoE model sees tokens the
dense model has not), else it starts at the MoE config's beginning. `OUT/upcycle.json` records
where the weights came from. MOE_CONFIG may also be a dense config of the same shapes: every
weight is then copied (the dense model restarted with a fresh optimizer, as the continued-dense
arm of experiments/upcycling is).

Arrays pass through the host (numpy) on the way: fine for the models of this codebase, not for
checkpoints larger than host memory.
"""
from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from moejax.errors import ConfigError

METHODS = ("sparse", "drop")

# Fields whose values fix the shapes (or meaning) of the weights that are copied as they are.
_SAME_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "tie_embeddings", "attention", "qkv_bias", "qk_norm", "moe.expert_type")
_MLA_FIELDS = ("mla.q_lora_rank", "mla.kv_lora_rank", "mla.rope_head_dim", "mla.v_head_dim")


def dense_ffn_width(model: ml_collections.ConfigDict) -> int:
  """Hidden width of a dense layer's FFN: `model.dense_d_ff`, or `model.d_ff` when 0."""
  return model.get("dense_d_ff", 0) or model.d_ff


def read_dense_config(dense_workdir: str) -> ml_collections.ConfigDict:
  """The config a dense run started with, `dense_workdir/config.json` (written by
  `moejax.train.train_and_evaluate`); JSON lists come back as tuples.

  Raises:
    FileNotFoundError: the workdir, its config.json or its checkpoints are missing (the
      message names the path and `--from`).
  """
  if not os.path.isdir(dense_workdir):
    raise FileNotFoundError(f"--from {dense_workdir!r}: no such directory (expected a workdir "
                            "written by `python -m moejax.main` with a dense config)")
  path = os.path.join(dense_workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--from {dense_workdir!r}: {path} is missing (moejax.main writes it "
                            "when a run starts; it says which model the checkpoint holds)")
  ckpt = os.path.join(dense_workdir, "checkpoints")
  if not os.path.isdir(ckpt) or not any(n.isdigit() for n in os.listdir(ckpt)):
    raise FileNotFoundError(f"--from {dense_workdir!r}: no complete checkpoint in {ckpt}")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))


def _tuples(value):
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def _field(model, dotted: str, default=None):
  node = model
  for part in dotted.split("."):
    if part not in node:
      return default
    node = node[part]
  return node


def check_compatible(dense: ml_collections.ConfigDict, moe: ml_collections.ConfigDict,
                     source: str = "the dense checkpoint") -> None:
  """Can `dense` (a whole config, `source` names its file) be upcycled into `moe`? Raises
  `ConfigError` naming the MoE config's field, its value and the value the dense model has."""
  from moejax.moe import is_moe_layer, moe_dims  # noqa: PLC0415
  dm, mm = dense.model, moe.model
  moe_layers = [i for i in range(dm.num_layers) if is_moe_layer(dm, i)]
  if moe_layers:
    raise ConfigError(f"{source}: model.moe_every", dm.moe_every,
                      f"0: --from must be a dense model (layers {moe_layers} are MoE)")
  fields = _SAME_FIELDS + (_MLA_FIELDS if mm.get("attention", "mha") == "mla" else ())
  for f in fields:
    want = _field(dm, f)
    if _field(mm, f, want) != want:
      raise ConfigError(f"model.{f}", _field(mm, f),
                        f"{want!r}, the dense model's ({source}): the weights are copied as they are")
  width = dense_ffn_width(dm)
  if mm.moe.num_shared_experts:
    raise ConfigError("model.moe.num_shared_experts", mm.moe.num_shared_experts,
                      "0: upcycling copies the dense FFN into the routed experts only")
  dims = moe_dims(mm)
  if dims.expert_width != width:
    raise ConfigError("model.d_ff", mm.d_ff,
                      f"{width * mm.moe.granularity} so that an expert (d_ff / granularity = "
                      f"{dims.expert_width} wide) has the dense FFN's width {width} ({source})")
  kept = [i for i in range(mm.num_layers) if not is_moe_layer(mm, i)]
  if kept and dense_ffn_width(mm) != width:
    raise ConfigError("model.dense_d_ff", mm.get("dense_d_ff", 0),
                      f"0 or {width}: the dense layers {kept} keep the dense FFN, width {width} "
                      f"({source})")


def _name(path: tuple) -> str:
  return ".".join(str(k) for k in path)


# Parameters no dense model has: routers (an MoE layer's `router`, its Chain-of-Experts
# iterations' `chain_routers`, a Mixture-of-Depths block's `mod_router`; MoE++'s gating residual
# lives in the router) and MoE++'s constant experts (`zero_experts`).
_FRESH = ("router", "chain_routers", "mod_router", "zero_experts")


def _is_fresh(path: tuple) -> bool:
  """Whether the MoE parameter at `path` has no dense counterpart and keeps the MoE config's
  initialisation (`_FRESH`)."""
  return any(name in path for name in _FRESH)


def _expert_source(path: tuple) -> tuple | None:
  """blocks.i.ffn.experts.w.<name> [E, ...] -> blocks.i.ffn.w.<name>, the dense FFN matrix."""
  if len(path) >= 4 and path[-4:-1] == ("ffn", "experts", "w"):
    return path[:-3] + ("w", path[-1])
  return None


def drop_upcycle(w: dict[str, np.ndarray], num_experts: int, rate: float,
                 rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """E experts from one dense FFN, each with a fraction `rate` of its F intermediate indices
  re-initialised (Drop-Upcycling, arXiv:2502.19261; rate 0: sparse upcycling, arXiv:2212.05055).

  Args:
    w: the dense FFN, {name: [D, F]} for the D -> F matrices and `down`: [F, D].
    rate: r in [0, 1]; n = round(r F) indices per expert.
    rng: draws, per expert, S_e and then the new values of each matrix in sorted name order.
  Returns:
    ({name: [E, D, F] / [E, F, D]} in the dense dtype, S [E, n] int64 sorted per expert).
  """
  f_axis = {n: (0 if n == "down" else 1) for n in w}
  width = w["down"].shape[0]
  n = int(round(rate * width))
  stats = {k: (float(np.mean(v, dtype=np.float64)), float(np.std(v, dtype=np.float64)))
           for k, v in w.items()}
  out = {k: np.repeat(np.asarray(v)[None], num_experts, axis=0) for k, v in w.items()}
  chosen = np.zeros((num_experts, n), np.int64)
  for e in range(num_experts):
    chosen[e] = np.sort(rng.choice(width, size=n, replace=False))
    for k in sorted(w):
      mean, std = stats[k]
      expert = out[k][e]
      if f_axis[k] == 0:
        shape = (n, expert.shape[1])
        expert[chosen[e], :] = rng.normal(mean, std, shape).astype(expert.dtype)
      else:
        shape = (expert.shape[0], n)
        expert[:, chosen[e]] = rng.normal(mean, std, shape).astype(expert.dtype)
  return out, chosen


def drop_rate_of(method: str, drop_rate: float | None) -> float:
  """The r a method uses: 0 for sparse upcycling; `drop_rate` (default 0.5, Drop-Upcycling's
  best in the paper) for "drop". Raises ValueError naming the flag for anything else."""
  if method not in METHODS:
    raise ValueError(f"--method {method!r}: allowed are {METHODS}")
  if method == "sparse":
    if drop_rate:
      raise ValueError(f"--drop_rate {drop_rate!r}: allowed only with --method drop")
    return 0.0
  rate = 0.5 if drop_rate is None else drop_rate
  if not (isinstance(rate, (int, float)) and 0 < rate <= 1):
    raise ValueError(f"--drop_rate {rate!r}: allowed is a fraction in (0, 1] with --method drop")
  return float(rate)


def upcycle_params(dense: dict, moe_init: dict, *, method: str = "sparse",
                   drop_rate: float | None = None, seed: int = 0) -> dict:
  """MoE parameters from dense ones (pure dicts of arrays, as `nnx.to_pure_dict`).

  Every leaf of `moe_init` (the MoE model's fresh initialisation, which gives the structure,
  shapes and dtypes) is filled: routers keep their initialisation; an expert bank
  `...ffn.experts.w.<name>` [E, ...] gets E copies of the dense `...ffn.w.<name>` (Drop-
  Upcycling re-initialises a fraction of each, `drop_upcycle`); every other leaf is the dense
  leaf at the same path, cast to the MoE dtype (bit for bit when the dtypes agree).
  `drop_rate` r: Drop-Upcycling's fraction (method "drop"; None: the paper's best, 0.5).

  Raises:
    ValueError: a bad method or rate; an MoE weight without a dense source, a dense weight left
      unused, or a shape mismatch (naming the parameter's path).
  """
  rate = drop_rate_of(method, drop_rate)
  src, dst = flatten_dict(dense), flatten_dict(moe_init)
  rng = np.random.default_rng(seed)
  used, out, banks = set(), {}, {}
  for path in sorted(dst, key=_name):
    like = np.asarray(dst[path])
    if _is_fresh(path):
      out[path] = like
      continue
    source = path if path in src else _expert_source(path)
    if source is None or source not in src:
      raise ValueError(f"MoE parameter {_name(path)} {tuple(like.shape)}: no dense weight to "
                       "upcycle it from (only routers and MoE++'s experts may be new)")
    want = tuple(like.shape[1:]) if source != path else tuple(like.shape)
    if tuple(np.shape(src[source])) != want:
      raise ValueError(f"MoE parameter {_name(path)} needs {want} from the dense "
                       f"{_name(source)}, which is {tuple(np.shape(src[source]))}")
    used.add(source)
    if source == path:
      out[path] = np.asarray(src[source]).astype(like.dtype)
    else:
      banks.setdefault(path[:-1], {})[path[-1]] = (source, like)
  for prefix, members in sorted(banks.items(), key=lambda kv: _name(kv[0])):
    w = {name: np.asarray(src[source]) for name, (source, _) in members.items()}
    num_experts = next(iter(members.values()))[1].shape[0]
    experts, _ = drop_upcycle(w, num_experts, rate, rng)
    for name, (_, like) in members.items():
      out[prefix + (name,)] = experts[name].astype(like.dtype)
  unused = sorted(_name(p) for p in set(src) - used)
  if unused:
    raise ValueError(f"dense weights with no place in the MoE model: {unused}")
  return unflatten_dict(out)


def upcycle(dense_workdir: str, config: ml_collections.ConfigDict, workdir: str, *,
            method: str = "sparse", drop_rate: float | None = None,
            seed: int | None = None) -> dict:
  """Writes the upcycled MoE checkpoint of `dense_workdir`'s latest checkpoint into `workdir`
  (see the module docstring); `config` is the MoE config, `seed` the re-initialisation's
  (default: `config.seed`). Returns what `workdir/upcycle.json` records.

  Raises:
    FileNotFoundError: `dense_workdir` is not a dense run's workdir (names the path).
    ConfigError: the MoE config cannot hold the dense weights (names the field).
    ValueError: bad method or rate; `workdir` already holds a checkpoint.
  """
  import jax  # noqa: PLC0415
  from moejax import checkpoint, data, sharding  # noqa: PLC0415
  from moejax.config import validate  # noqa: PLC0415
  from moejax.train import Trainer  # noqa: PLC0415

  rate = drop_rate_of(method, drop_rate)
  dense = read_dense_config(dense_workdir)
  source = os.path.join(dense_workdir, "config.json")
  validate(config)
  check_compatible(dense, config, source)
  out_ckpt = os.path.join(workdir, "checkpoints")
  if os.path.isdir(out_ckpt) and any(n.isdigit() for n in os.listdir(out_ckpt)):
    raise ValueError(f"--workdir {workdir!r} already holds a checkpoint in {out_ckpt}; "
                     "upcycle into a new directory")
  # The dense state onto one device: its own mesh fields need not fit this machine.
  dense = ml_collections.ConfigDict(dense.to_dict())
  dense.mesh.update(preset="", data=-1, fsdp=1, expert=1, tensor=1)
  one = sharding.make_mesh(dense.mesh, devices=jax.devices()[:1])
  dense_trainer = Trainer(dense, mesh=one)
  with checkpoint.Checkpointer(os.path.join(dense_workdir, "checkpoints"), keep=1,
                               every=0) as ckpt:
    dense_step, dense_state, dense_extra = ckpt.restore(
        abstract_state=dense_trainer.abstract_state())
  dense_params = jax.device_get(dense_state["params"])

  trainer = Trainer(config)
  state = trainer.init_state()
  seed = config.seed if seed is None else seed
  params = upcycle_params(dense_params, jax.device_get(state["params"]), method=method,
                          drop_rate=rate or None, seed=seed)
  state["params"] = jax.device_put(params, trainer.param_shardings)
  same_data = dense.data.to_dict() == config.data.to_dict()
  data_state = (dense_extra["data"] if same_data else
                data.make_source(config, "train").get_state())
  t = config.train
  with checkpoint.Checkpointer(out_ckpt, keep=t.keep_checkpoints, every=t.checkpoint_every) as c:
    c.save(0, state, {"data": data_state, "nan_guard": {"skipped": 0, "in_row": 0}}, force=True)
  record = {"from": os.path.abspath(dense_workdir), "from_step": int(dense_step),
            "method": method, "drop_rate": rate,
            "seed": int(seed), "data": "continued" if same_data else "fresh",
            "checkpoint": os.path.join(os.path.abspath(out_ckpt), "0")}
  with open(os.path.join(workdir, "upcycle.json"), "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1)
  return record


def main(argv):
  from absl import app, logging  # noqa: PLC0415
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    record = upcycle(_FROM.value, _CONFIG.value, _WORKDIR.value, method=_METHOD.value,
                     drop_rate=_DROP_RATE.value, seed=_SEED.value)
  except (FileNotFoundError, ValueError) as e:   # ConfigError is a ValueError
    raise app.UsageError(str(e)) from None
  print(json.dumps(record, indent=1))
  config_file = config_flags.get_config_filename(flags.FLAGS["config"])
  print(f"train it: python -m moejax.main --config={config_file} --workdir={_WORKDIR.value} "
        "(with the same --config.* overrides)")


if __name__ == "__main__":
  # Flags only when run as a program: `moejax.main` defines --config and --workdir as well, and
  # both modules may be imported into one process (tests, notebooks).
  from absl import app, flags
  from ml_collections import config_flags

  _FROM = flags.DEFINE_string("from", None, "Workdir of a dense run (config.json, checkpoints/).",
                              required=True)
  _CONFIG = config_flags.DEFINE_config_file("config", None, "The MoE config file.",
                                            lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "Where the MoE checkpoint goes.", required=True)
  _METHOD = flags.DEFINE_enum("method", "sparse", METHODS,
                              "sparse (arXiv:2212.05055) or drop (arXiv:2502.19261).")
  _DROP_RATE = flags.DEFINE_float("drop_rate", None,
                                  "Drop-Upcycling's r: fraction of each expert's F indices "
                                  "re-initialised (--method drop; default 0.5, the paper's best).")
  _SEED = flags.DEFINE_integer("seed", None, "Seed of the re-initialisation (default: the "
                               "config's seed).")
  flags.mark_flag_as_required("config")
  app.run(main)
