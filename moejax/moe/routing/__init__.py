"""Routers, looked up by name (`model.moe.router`).

A router turns token representations into one typed `Routing`; dispatch never asks which router
made it. Register a new router with `@ROUTERS.register("name")` in its own file (one file per
router family) and import that file below; the layer and the configs need no change.
"""
from moejax.moe.routing.base import ROUTERS, Router, RouterState, Routing, top_k_lowest_index
from moejax.moe.routing import topk  # noqa: F401  (registers topk, sigmoid, switch)

__all__ = ["ROUTERS", "Router", "RouterState", "Routing", "top_k_lowest_index"]
