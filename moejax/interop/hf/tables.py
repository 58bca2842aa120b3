"""What every family module shares: the name table's entries, the tensor transforms, the
refusals, and the pieces of config.json and of the table that several families have in common.

A family's table is a list of `Tensor`s, one per checkpoint tensor, in the style of nanoGPT's
`from_pretrained`: the checkpoint name, the moejax parameter path (and expert index, for a slice
of a stacked expert bank), and a transform. torch's `nn.Linear` stores [out, in], moejax [in,
out] split into named axes, so most weights are `LINEAR` (transposed, then reshaped); the
loader asserts every tensor's shape against the moejax parameter.

Not a paper implementation: checkpoint plumbing for the families of the sibling modules (their
papers are cited there).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from moejax.errors import ConfigError
from moejax.moe.layer import VARIANT_DEFAULTS


class UnsupportedCheckpoint(ConfigError):
  """A config.json field holds an option moejax does not implement (README, "Hugging Face
  checkpoints"); the message names the field, its value and what moejax accepts."""

  def __init__(self, field: str, value: Any, allowed: str):
    super().__init__(f"config.json:{field}", value, allowed)


@dataclasses.dataclass(frozen=True)
class Transform:
  """Checkpoint layout <-> moejax layout of one tensor.

  kind: "copy" (same array), "linear" (torch [out, in] -> moejax [in, out...]: transposed, the
  out side reshaped to the parameter's trailing axes), "linear_out" (torch [out, in...] -> moejax
  [in..., out]: transposed, the in side reshaped to the leading axes, e.g. wo [H, Dh, D]),
  "row" (torch [1, D] -> moejax [D]).
  deinterleave: R > 0 permutes the last R entries of the moejax parameter's last axis from
  interleaved RoPE pairs (x0, x1), (x2, x3)... to halves (x0, x2, ...), (x1, x3, ...); the moejax
  `rope` pairs halves (DeepSeek-V3's `rope_interleave`; RoFormer, arXiv:2104.09864, rotates
  any fixed pairing). q.k is unchanged when q and k are
  permuted alike.
  """
  kind: str
  deinterleave: int = 0

  def load(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Checkpoint tensor -> moejax array of `shape`."""
    if self.kind == "copy":
      out = w
    elif self.kind in ("linear", "linear_out"):
      out = w.T
    elif self.kind == "row":
      out = w.reshape(-1)
    else:
      raise ValueError(f"unknown transform {self.kind!r}")
    # The shape assert: the axes the transform keeps must match exactly, the ones it splits
    # (heads x head_dim) in size.
    n = int(np.prod(shape))
    fits = {"copy": tuple(out.shape) == tuple(shape),
            "row": out.size == n,
            "linear": out.shape[0] == shape[0] and out.size == n,
            "linear_out": out.shape[-1] == shape[-1] and out.size == n}[self.kind]
    if not fits:
      raise ValueError(f"{self.kind} gives {tuple(out.shape)}, which does not fit {tuple(shape)}")
    out = out.reshape(shape)
    if self.deinterleave:
      out = _permute_tail(out, self.deinterleave, inverse=False)
    return out

  def save(self, p: np.ndarray) -> np.ndarray:
    """moejax array -> checkpoint tensor (the inverse of `load`)."""
    if self.deinterleave:
      p = _permute_tail(p, self.deinterleave, inverse=True)
    if self.kind == "copy":
      return p
    if self.kind == "linear":
      return p.reshape(p.shape[0], -1).T
    if self.kind == "linear_out":
      return p.reshape(-1, p.shape[-1]).T
    if self.kind == "row":
      return p.reshape(1, -1)
    raise ValueError(f"unknown transform {self.kind!r}")


def _permute_tail(a: np.ndarray, r: int, *, inverse: bool) -> np.ndarray:
  """Interleaved pairs <-> halves on the last r entries of the last axis."""
  perm = np.concatenate([np.arange(0, r, 2), np.arange(1, r, 2)])
  if inverse:
    perm = np.argsort(perm)
  head, tail = a[..., :a.shape[-1] - r], a[..., a.shape[-1] - r:]
  return np.concatenate([head, tail[..., perm]], axis=-1)


COPY, LINEAR, LINEAR_OUT, ROW = (Transform("copy"), Transform("linear"), Transform("linear_out"),
                                 Transform("row"))


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One checkpoint tensor: its name, the moejax parameter it fills (a path in
  `nnx.to_pure_dict(nnx.state(model))`, e.g. ("blocks", 0, "attn", "wq")), the transform, and
  for an expert bank the index on the parameter's leading expert axis."""
  name: str
  path: tuple
  transform: Transform = COPY
  expert: int | None = None


def path(dotted: str) -> tuple:
  """"blocks.0.attn.wq" -> ("blocks", 0, "attn", "wq")."""
  return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


# ---- config.json ------------------------------------------------------------------------------

def refuse_unless(hf: dict, field: str, ok, allowed: str) -> None:
  """Raises UnsupportedCheckpoint unless `ok(hf.get(field))`."""
  value = hf.get(field)
  if not ok(value):
    raise UnsupportedCheckpoint(field, value, allowed)


def rope_theta(hf: dict) -> float:
  """RoPE base of config.json (transformers 5 `rope_parameters`, or the older `rope_theta` /
  `rope_scaling`); refuses scaled RoPE variants (YaRN, linear, dynamic, llama3...)."""
  params = hf.get("rope_parameters") or {}
  if "rope_parameters" in hf and params.get("rope_type", "default") != "default":
    raise UnsupportedCheckpoint("rope_parameters.rope_type", params.get("rope_type"),
                                "'default' (moejax has no RoPE scaling variants)")
  refuse_unless(hf, "rope_scaling", lambda v: not v or v.get("rope_type", v.get("type")) in (
      None, "default"), "null (moejax has no RoPE scaling variants)")
  return float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))


def common_config(hf: dict) -> dict:
  """moejax model fields every family shares (dotted names, relative to the config root), after
  the refusals every family shares."""
  refuse_unless(hf, "tie_word_embeddings", lambda v: not v,
                "false (moejax's tied head scales the logits by d_model**-0.5; HF's does not)")
  refuse_unless(hf, "hidden_act", lambda v: v in (None, "silu"), "'silu' (SwiGLU experts)")
  refuse_unless(hf, "quantization_config", lambda v: not v,
                "absent (quantized weights, e.g. DeepSeek-V3's fp8 release, are not read; "
                "convert them to bfloat16 first)")
  refuse_unless(hf, "attention_bias", lambda v: not v,
                "false (moejax has q/k/v biases only, via model.qkv_bias)")
  if hf.get("use_sliding_window") or hf.get("sliding_window") and "use_sliding_window" not in hf:
    field = "use_sliding_window" if hf.get("use_sliding_window") else "sliding_window"
    raise UnsupportedCheckpoint(field, hf[field], "no sliding window (moejax attends to the "
                                "whole causal context)")
  layer_types = hf.get("layer_types")
  if layer_types and any(t != "full_attention" for t in layer_types):
    raise UnsupportedCheckpoint("layer_types", layer_types, "only 'full_attention' layers")
  d, h = hf["hidden_size"], hf["num_attention_heads"]
  return {
      "model.vocab_size": hf["vocab_size"],
      "model.d_model": d,
      "model.num_layers": hf["num_hidden_layers"],
      "model.num_heads": h,
      "model.num_kv_heads": hf.get("num_key_value_heads") or h,
      "model.head_dim": hf.get("head_dim") or d // h,
      "model.max_len": hf.get("max_position_embeddings", 4096),
      "model.tie_embeddings": False,
      "model.rope_theta": rope_theta(hf),
      "model.norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
      "model.moe.expert_type": "swiglu",
      "model.moe.dispatch": "dropless",      # exact: no token is dropped, as in transformers
      "model.moe.lb_loss_weight": float(hf.get("router_aux_loss_coef", 0.01)),
  }


def common_config_json(m, model_type: str, architecture: str) -> dict:
  """config.json fields every family shares, from the moejax `model` subtree."""
  return {
      "model_type": model_type,
      "architectures": [architecture],
      "vocab_size": m.vocab_size,
      "hidden_size": m.d_model,
      "num_hidden_layers": m.num_layers,
      "num_attention_heads": m.num_heads,
      "num_key_value_heads": m.num_kv_heads,
      "head_dim": m.head_dim,
      "max_position_embeddings": m.max_len,
      "tie_word_embeddings": False,
      "rope_parameters": {"rope_type": "default", "rope_theta": float(m.rope_theta)},
      "rms_norm_eps": float(m.norm_eps),
      "hidden_act": "silu",
      "router_aux_loss_coef": float(m.moe.lb_loss_weight),
      "dtype": "float32",
  }


# ---- table pieces ----------------------------------------------------------------------------

def embeddings_table() -> list[Tensor]:
  """Token embedding, final norm and (untied) output head."""
  return [Tensor("model.embed_tokens.weight", ("embed",)),
          Tensor("model.norm.weight", ("final_norm", "scale")),
          Tensor("lm_head.weight", ("head",), LINEAR)]


def attention_table(i: int, *, bias: bool = False, qk_norm: bool = False) -> list[Tensor]:
  """Layer i's pre-norms and Llama-style q/k/v/o projections (optionally biases, q/k norms)."""
  hf, mj = f"model.layers.{i}.", ("blocks", i)
  out = [Tensor(hf + "input_layernorm.weight", mj + ("attn_norm", "scale")),
         Tensor(hf + "post_attention_layernorm.weight", mj + ("ffn_norm", "scale")),
         Tensor(hf + "self_attn.o_proj.weight", mj + ("attn", "wo"), LINEAR_OUT)]
  for p in "qkv":
    out.append(Tensor(hf + f"self_attn.{p}_proj.weight", mj + ("attn", f"w{p}"), LINEAR))
    if bias:
      out.append(Tensor(hf + f"self_attn.{p}_proj.bias", mj + ("attn", f"b{p}")))
  if qk_norm:
    out += [Tensor(hf + f"self_attn.{p}_norm.weight", mj + ("attn", f"{p}_norm", "scale"))
            for p in "qk"]
  return out


def mlp_table(prefix: str, mj: tuple, names=("gate_proj", "up_proj", "down_proj")) -> list[Tensor]:
  """A dense SwiGLU FFN (moejax `MLP`: w.gate, w.up, w.down) from `prefix`{gate,up,down}."""
  return [Tensor(f"{prefix}{n}.weight", mj + ("w", w), LINEAR)
          for n, w in zip(names, ("gate", "up", "down"))]


def experts_table(prefix: str, mj: tuple, num_experts: int,
                  names=("gate_proj", "up_proj", "down_proj")) -> list[Tensor]:
  """Per-expert SwiGLU tensors `prefix`{j}.{name}.weight -> the stacked bank's slices."""
  return [Tensor(f"{prefix}{j}.{n}.weight", mj + ("experts", "w", w), LINEAR, expert=j)
          for j in range(num_experts) for n, w in zip(names, ("gate", "up", "down"))]


# ---- export checks ---------------------------------------------------------------------------

# Fields whose value decides whether a moejax model fits a family, with the value a config that
# does not set them has.
_EXPORT_DEFAULTS = {"tie_embeddings": True, "moe.expert_type": "swiglu", "moe.granularity": 1,
                    "moe.router_args.softmax_order": "before", "moe.router_args.renormalize": False,
                    "qkv_bias": False, "qk_norm": "", "attention": "mha",
                    "moe.num_shared_experts": 0, "moe.shared_expert_gate": False,
                    "first_dense_layers": 0, "dense_layers": (), "dense_d_ff": 0,
                    "moe.bias_update_rate": 0.0,
                    # The expert variants (moejax.moe.variants): no released family has them.
                    "moe.layer": "sparse", "mod_capacity": 0.0,
                    **{f"moe.{field}": v for field, v in VARIANT_DEFAULTS.items()}}


def _field(m, dotted: str):
  node = m
  for part in dotted.split("."):
    if part not in node:
      return _EXPORT_DEFAULTS.get(dotted)
    node = node[part]
  return tuple(node) if isinstance(node, list) else node


def check_exportable(m, family: str, allowed: dict) -> None:
  """Raises ConfigError naming the first `model.<field>` whose value `family` cannot express.

  `allowed`: {dotted field under model: tuple of allowed values}; tie_embeddings False, SwiGLU
  experts, granularity 1 and the plain sparse layer (no expert variant) are always required.
  """
  base = {"tie_embeddings": (False,), "moe.expert_type": ("swiglu",), "moe.granularity": (1,),
          "moe.layer": ("sparse",), "mod_capacity": (0, 0.0, 1, 1.0),
          **{f"moe.{field}": (v,) for field, v in VARIANT_DEFAULTS.items()}}
  for f, ok in {**base, **allowed}.items():
    value = _field(m, f)
    if value not in ok:
      raise ConfigError(f"model.{f}", value, f"one of {ok} to export as {family}")
