"""Compute-optimal allocation: the numeric solver against Hoffmann et al.'s (2022,
arXiv:2203.15556) closed form, and iso-FLOP curves against their minimum."""
import numpy as np
import pytest

from moejax.scaling import get_law, make_law
from moejax.scaling.optimal import chinchilla_optimal, isoflop_curve, optimal_allocation

EPOCH = {"E": 1.8172, "A": 477.84, "B": 2143.86, "alpha": 0.3473, "beta": 0.3672}


def test_closed_form_satisfies_the_first_order_condition():
  """At the optimum of E + A N^-a + B D^-b with D = C/(6N): a A N^-a = b B D^-b."""
  v = chinchilla_optimal(EPOCH, 1e21).variables
  assert 6 * v["N"] * v["D"] == pytest.approx(1e21)
  assert EPOCH["alpha"] * EPOCH["A"] * v["N"] ** -EPOCH["alpha"] == pytest.approx(
      EPOCH["beta"] * EPOCH["B"] * v["D"] ** -EPOCH["beta"])


def test_numeric_matches_closed_form():
  law = get_law("chinchilla")
  for c in (1e19, 1e23):
    closed = chinchilla_optimal(EPOCH, c)
    numeric = optimal_allocation(law, EPOCH, c, flops_per_token=lambda N, **_: 6.0 * N)
    assert numeric.variables["N"] == pytest.approx(closed.variables["N"], rel=1e-3)
    assert numeric.loss == pytest.approx(closed.loss, rel=1e-9)


def test_isoflop_minimum_is_the_optimum():
  law = get_law("chinchilla")
  curve = isoflop_curve(law, EPOCH, 1e21, num=401)
  n_best = curve["N"][np.argmin(curve["loss"])]
  assert n_best == pytest.approx(chinchilla_optimal(EPOCH, 1e21).variables["N"], rel=0.02)


def test_granularity_optimum_is_interior_with_router_cost():
  """fine_grained + a router cost that grows with G: G* is interior, and fixing G at G* gives
  the same loss as the joint optimum (it is a minimum over G too)."""
  from moejax.scaling.optimal import fine_grained_flops_per_token
  law = get_law("fine_grained")
  p = {"a": 18.1, "alpha": 0.115, "b": 30.8, "beta": 0.147, "g": 2.1, "gamma": 0.58, "c": 0.47}
  cost = fine_grained_flops_per_token()
  best = optimal_allocation(law, p, 1e21, flops_per_token=cost)
  assert "G" not in best.at_bound and 1.0 < best.variables["G"] < 64.0
  for g in (best.variables["G"] / 2, best.variables["G"] * 2):
    other = optimal_allocation(law, p, 1e21, fixed={"G": g}, flops_per_token=cost)
    assert other.loss > best.loss


def test_expert_count_on_a_bound_is_reported():
  law = make_law("joint_moe")
  p = {"a": 36.0, "alpha": -0.19, "gamma": 0.0, "delta": -0.1, "b": 36.0, "beta": -0.18,
       "zeta": 0.0, "omega": 0.0, "c": 1.36}
  alloc = optimal_allocation(law, p, 1e21, bounds={"E": (1.0, 256.0)})
  assert alloc.variables["E"] == pytest.approx(256.0, rel=1e-3) and "E" in alloc.at_bound


def test_law_without_tokens_is_refused():
  p = dict(get_law("clark").published_by_router["S-Base"])
  with pytest.raises(ValueError, match=r"law = 'clark'.*token variable D"):
    optimal_allocation(get_law("clark"), p, 1e21)
