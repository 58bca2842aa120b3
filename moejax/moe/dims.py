"""The MoE sizes after fine-grained segmentation, derived once from the config."""
from __future__ import annotations

import dataclasses

import ml_collections


@dataclasses.dataclass(frozen=True)
class MoEDims:
  """Expert counts and widths of the bank, granularity applied.

  Granularity G splits each of the config's `num_experts` experts of width `d_ff` into G experts
  of width d_ff/G and routes each token to `top_k`*G of them, keeping active FLOPs fixed
  ("Scaling Laws for Fine-Grained Mixture of Experts", Krajewski et al. 2024, arXiv:2402.07871).
  Shared experts follow DeepSeekMoE (arXiv:2401.06066): always-on experts of the same
  fine-grained width. E and K everywhere else in moejax are `experts` and `experts_per_token`.
  """
  experts: int             # E = model.moe.num_experts * G
  experts_per_token: int   # K = model.moe.top_k * G
  expert_width: int        # F = model.d_ff / G
  shared_width: int        # model.moe.num_shared_experts * F (0: none)


def moe_dims(model: ml_collections.ConfigDict) -> MoEDims:
  """Derived MoE sizes of `model` (the `config.model` subtree); see `MoEDims`."""
  moe = model.moe
  g = moe.granularity
  width = model.d_ff // g
  return MoEDims(experts=moe.num_experts * g, experts_per_token=moe.top_k * g,
                 expert_width=width, shared_width=moe.num_shared_experts * width)


def is_moe_layer(model: ml_collections.ConfigDict, layer: int) -> bool:
  """Whether 0-based `layer` has an MoE FFN: every `moe_every`-th layer (none when 0), except
  the first `first_dense_layers` layers and those listed in `dense_layers` (DeepSeek-V3's
  `first_k_dense_replace`, arXiv:2412.19437; Qwen2-MoE's `mlp_only_layers`, arXiv:2407.10671)."""
  return (model.moe_every > 0 and (layer + 1) % model.moe_every == 0
          and layer >= model.get("first_dense_layers", 0)
          and layer not in tuple(model.get("dense_layers", ())))
