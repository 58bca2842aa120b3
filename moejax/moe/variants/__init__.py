"""MoE FFN layers, looked up by name (`model.moe.layer`): the sparse layer of `moejax.moe.layer`
and the variants of the literature that change what an expert is or how a token reaches it.

Every layer is a `moejax.moe.layer.MoEFFN`: the same constructor, the same `forward` with the
routing state carried from one MoE layer to the next. Register a new one with
`@MOE_LAYERS.register("name")` in its own file and import that file below.
"""
from moejax.moe.layer import MoEFFN, MoELayer
from moejax.registry import Registry

MOE_LAYERS = Registry("model.moe.layer", {"sparse": MoELayer})

__all__ = ["MOE_LAYERS", "MoEFFN"]

from moejax.moe.variants import rexmoe  # noqa: E402,F401  (registers rexmoe: ReXMoE)
from moejax.moe.variants import aoe  # noqa: E402,F401  (registers aoe: Autonomy-of-Experts)
from moejax.moe.variants import soft, smear, tokens, peer, multi_head  # noqa: E402,F401  (soft, smear, mot, peer, multi_head)
