"""Routers, looked up by name (`model.moe.router`).

A router turns token representations into one typed `Routing`; dispatch never asks which router
made it. Register a new router with `@register("name")` in its own file and import that file
below; the layer and the configs need no change.
"""
from moejax.routing.base import ROUTERS, Router, Routing, register
from moejax.routing import topk  # noqa: F401  (registers topk, sigmoid, switch)

__all__ = ["ROUTERS", "Router", "Routing", "register"]
