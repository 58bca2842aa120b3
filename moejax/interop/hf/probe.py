"""Router logits of every MoE layer, for parity checks against transformers'
`output_router_logits=True` and for routing analysis (notebooks/routing_analysis.ipynb)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def router_logits(model, inputs: jax.Array, positions: jax.Array | None = None,
                  segment_ids: jax.Array | None = None) -> dict[int, jax.Array]:
  """{layer index: router logits [B*S, E] float32} of each MoE layer of a moejax `Transformer`
  on `inputs` [B, S] (eval mode), as transformers' `output_router_logits=True` gives them: the
  gate of each sparse MoE layer ("Outrageously Large Neural Networks", Shazeer et al. 2017,
  arXiv:1701.06538) applied to its input."""
  return {i: logits for i, (logits, _) in _layers(model, inputs, positions, segment_ids).items()}


def routings(model, inputs: jax.Array, positions: jax.Array | None = None,
             segment_ids: jax.Array | None = None) -> dict:
  """{layer index: `Routing`} of each MoE layer on `inputs` [B, S] (eval mode): which experts
  each of the B*S tokens went to (`expert_index` [B*S, K]) and with what weight, for routing
  analysis (e.g. OpenMoE's token-id specialisation, arXiv:2402.01739)."""
  return {i: r for i, (_, r) in _layers(model, inputs, positions, segment_ids).items()}


def _layers(model, inputs, positions, segment_ids):
  """The forward pass of `Transformer.__call__`, block by block, recording each MoE layer's
  router logits and routing decision (its input is recomputed from the block's input)."""
  b, s = inputs.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  if segment_ids is None:
    segment_ids = jnp.ones((b, s), jnp.int32)
  x = model.embed[...].astype(model.dtype)[inputs]
  out = {}
  for i, block in enumerate(model.blocks):
    if block.is_moe:
      h = x + block.attn(block.attn_norm(x), positions, segment_ids).astype(x.dtype)
      h = block.ffn_norm(h).reshape(b * s, -1)
      mask = segment_ids.reshape(b * s) > 0
      out[i] = (block.ffn.router.logits(h, train=False, rng=None),
                block.ffn.route(h, mask, token_ids=inputs.reshape(b * s), num_sequences=b))
    x, _, _ = block(x, positions, segment_ids, train=False, rng=None, token_ids=inputs)
  return out
