"""Router logits of every MoE layer, for parity checks against transformers'
`output_router_logits=True` and for routing analysis (notebooks/routing_analysis.ipynb)."""
from __future__ import annotations

import jax

from moejax.moe import analysis


def router_logits(model, inputs: jax.Array, positions: jax.Array | None = None,
                  segment_ids: jax.Array | None = None) -> dict[int, jax.Array]:
  """{layer index: router logits [B*S, E] float32} of each MoE layer of a moejax `Transformer`
  on `inputs` [B, S] (eval mode), as transformers' `output_router_logits=True` gives them: the
  gate of each sparse MoE layer ("Outrageously Large Neural Networks", Shazeer et al. 2017,
  arXiv:1701.06538) applied to its input."""
  return _by_index(analysis.router_logits_trace(model, _batch(inputs, positions, segment_ids)))


def routings(model, inputs: jax.Array, positions: jax.Array | None = None,
             segment_ids: jax.Array | None = None) -> dict:
  """{layer index: `Routing`} of each MoE layer on `inputs` [B, S] (eval mode): which experts
  each of the B*S tokens went to (`expert_index` [B*S, K]) and with what weight, for routing
  analysis (e.g. OpenMoE's token-id specialisation, arXiv:2402.01739)."""
  return _by_index(analysis.routing_trace(model, _batch(inputs, positions, segment_ids)))


def _batch(inputs, positions, segment_ids) -> dict:
  batch = {"inputs": inputs}
  if positions is not None:
    batch["positions"] = positions
  if segment_ids is not None:
    batch["segment_ids"] = segment_ids
  return batch


def _by_index(per_layer: dict) -> dict:
  """{"layer_<i>": v} -> {i: v}, in layer order."""
  return {int(name.split("_")[1]): v for name, v in sorted(
      per_layer.items(), key=lambda kv: int(kv[0].split("_")[1]))}
