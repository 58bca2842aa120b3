"""Routers, looked up by name (`model.moe.router`).

A router turns token representations into one typed `Routing`; dispatch never asks which router
made it. Register a new router with `@ROUTERS.register("name")` in its own file (one file per
router family) and import that file below; the layer and the configs need no change.
"""
from moejax.moe.routing.base import ROUTERS, Router, RouterState, Routing, top_k_lowest_index
from moejax.moe.routing import topk  # noqa: F401  (registers topk, sigmoid, switch)
from moejax.moe.routing import base_layers  # noqa: F401  (registers base: BASE layers)
from moejax.moe.routing import cosine  # noqa: F401  (registers cosine: X-MoE)
from moejax.moe.routing import expert_choice  # noqa: F401  (registers expert_choice)
from moejax.moe.routing import top_p  # noqa: F401  (registers top_p)
from moejax.moe.routing import deepseek  # noqa: F401  (registers deepseek)
from moejax.moe.routing import fixed  # noqa: F401  (registers hash, random)
from moejax.moe.routing import relu  # noqa: F401  (registers relu: ReMoE)
from moejax.moe.routing import thor  # noqa: F401  (registers thor)
from moejax.moe.routing import rmoe  # noqa: F401  (registers rmoe: layerwise recurrent router)
from moejax.moe.routing.catalog import describe

__all__ = ["ROUTERS", "Router", "RouterState", "Routing", "describe", "top_k_lowest_index"]
