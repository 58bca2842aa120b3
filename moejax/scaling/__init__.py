"""Scaling-law toolkit: parameter/FLOP accounting, law forms, robust fits, compute-optimal
allocation. See experiments/scaling/README.md for the reproductions of published fits."""
from moejax.scaling.laws import LAWS, FixedParams, Law, get_law, make_law  # noqa: F401
from moejax.scaling.fitting import FitResult, fit  # noqa: F401
