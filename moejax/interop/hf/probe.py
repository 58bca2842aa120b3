"""Router logits of every MoE layer, for parity checks against transformers'
`output_router_logits=True` and for routing analysis (notebooks/routing_analysis.ipynb)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def router_logits(model, inputs: jax.Array, positions: jax.Array | None = None,
                  segment_ids: jax.Array | None = None) -> dict[int, jax.Array]:
  """{layer index: router logits [B*S, E] float32} of each MoE layer of a moejax `Transformer`
  on `inputs` [B, S] (eval mode). The forward pass is `Transformer.__call__`'s, block by block;
  the router input is recomputed from the block's input (the gate of a sparse MoE layer,
  "Outrageously Large Neural Networks", Shazeer et al. 2017, arXiv:1701.06538)."""
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
      out[i] = block.ffn.router.logits(block.ffn_norm(h).reshape(b * s, -1), train=False,
                                       rng=None)
    x, _, _ = block(x, positions, segment_ids, train=False, rng=None, token_ids=inputs)
  return out
