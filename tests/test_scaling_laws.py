"""Every registered law round-trips: points drawn from known parameters plus noise are fitted back
to those parameters, and the fit predicts held-out points. Also the laws' formulas against
hand-written numpy, and Clark's expert transform against its defining properties."""
import math

import numpy as np
import pytest

from moejax.scaling import LAWS, fit, get_law
from moejax.scaling.laws import clark_expert_transform

NOISE = 2e-3  # std of log-loss noise
# Clark's b, c and E_start trade off against each other; they separate only at lower noise.
NOISE_OF = {"clark": 3e-4}


def _grid(**axes):
  mesh = np.meshgrid(*axes.values(), indexing="ij")
  return {k: m.ravel() for k, m in zip(axes, mesh)}


# law -> (true params, variable grid, relative tolerance per parameter)
CASES = {
    "kaplan": ({"N_c": 8.8e13, "D_c": 5.4e13, "alpha_N": 0.076, "alpha_D": 0.095},
               _grid(N=np.geomspace(1e6, 1e10, 9), D=np.geomspace(1e7, 1e11, 9)),
               {"N_c": 1.0, "D_c": 1.0, "alpha_N": 0.1, "alpha_D": 0.1}),
    "chinchilla": ({"E": 1.8172, "A": 477.84, "B": 2143.86, "alpha": 0.3473, "beta": 0.3672},
                   _grid(N=np.geomspace(5e7, 2e10, 8), D=np.geomspace(1e9, 1e12, 8)),
                   {"E": 0.03, "A": 0.5, "B": 0.5, "alpha": 0.08, "beta": 0.08}),
    "fine_grained": ({"a": 18.1, "alpha": 0.115, "b": 30.8, "beta": 0.147, "g": 2.1, "gamma": 0.58,
                      "c": 0.47},
                     _grid(N=np.geomspace(1e8, 4e9, 5), D=np.geomspace(1e10, 2e11, 5),
                           G=np.array([1.0, 2, 4, 8, 16])),
                     {"a": 1.0, "alpha": 0.25, "b": 1.0, "beta": 0.25, "g": 0.5, "gamma": 0.25,
                      "c": 0.5}),
    "clark": (dict(LAWS["clark"].published_by_router["S-Base"]),
              _grid(N=np.geomspace(1.5e7, 1.3e9, 6), E=2.0 ** np.arange(10)),
              {"a": 0.05, "b": 0.1, "c": 0.15, "d": 0.02, "E_start": 0.3, "E_max": 0.5}),
    "joint_moe": ({"a": 36.0, "alpha": -0.19, "gamma": -0.01, "delta": 0.2, "b": 36.0,
                   "beta": -0.18, "zeta": 0.02, "omega": -0.5, "c": 1.36},
                  _grid(N=np.geomspace(1e7, 3e9, 6), D=np.geomspace(1e8, 1e11, 6),
                        E=np.array([1.0, 4, 16, 64])),
                  {"a": 1.0, "alpha": 0.25, "gamma": 0.5, "delta": 0.5, "b": 1.0, "beta": 0.25,
                   "zeta": 0.5, "omega": 0.5, "c": 0.1}),
}


def test_every_registered_law_has_a_case():
  assert set(CASES) == set(LAWS) == {"kaplan", "chinchilla", "fine_grained", "clark", "joint_moe"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip(name):
  law = get_law(name)
  truth, variables, rtol = CASES[name]
  noise = NOISE_OF.get(name, NOISE)
  rng = np.random.default_rng(0)
  loss = law.loss(truth, **variables) * np.exp(noise * rng.standard_normal(len(variables["N"])))
  starts = law.start_grid()
  starts = starts[np.linspace(0, len(starts) - 1, min(len(starts), 300)).astype(int)]
  r = fit(law, {**variables, "loss": loss}, loss="squares", starts=starts, max_iter=40)
  for k, tol in rtol.items():
    assert r.params[k] == pytest.approx(truth[k], rel=tol, abs=1e-3), (k, r.params, truth)
  # Residuals at the noise level, and held-out points (between grid nodes) predicted as well.
  assert r.rmse_log < 1.3 * noise
  held_out = {k: np.sqrt(v[:-1] * v[1:]) for k, v in variables.items()}
  err = np.log(law.loss(r.params, **held_out)) - np.log(law.loss(truth, **held_out))
  assert np.sqrt(np.mean(err ** 2)) < noise


def test_formulas_match_numpy():
  n, d, g, e = np.array([1e8, 3e9]), np.array([2e9, 7e10]), np.array([1.0, 8.0]), np.array([1., 32.])
  p = CASES["chinchilla"][0]
  np.testing.assert_allclose(get_law("chinchilla").loss(p, N=n, D=d),
                             p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"], rtol=1e-12)
  p = CASES["kaplan"][0]
  np.testing.assert_allclose(
      get_law("kaplan").loss(p, N=n, D=d),
      ((p["N_c"] / n) ** (p["alpha_N"] / p["alpha_D"]) + p["D_c"] / d) ** p["alpha_D"], rtol=1e-12)
  p = CASES["fine_grained"][0]
  np.testing.assert_allclose(
      get_law("fine_grained").loss(p, N=n, D=d, G=g),
      p["c"] + (p["g"] / g ** p["gamma"] + p["a"]) / n ** p["alpha"] + p["b"] / d ** p["beta"],
      rtol=1e-12)
  p = CASES["joint_moe"][0]
  np.testing.assert_allclose(
      get_law("joint_moe").loss(p, N=n, D=d, E=e),
      p["a"] * e ** p["delta"] * n ** (p["alpha"] + p["gamma"] * np.log(e))
      + p["b"] * e ** p["omega"] * d ** (p["beta"] + p["zeta"] * np.log(e)) + p["c"], rtol=1e-12)
  p = CASES["clark"][0]
  e_hat = clark_expert_transform(e, p["E_start"], p["E_max"])
  log10_l = (p["a"] * np.log10(n) + p["b"] * np.log10(e_hat)
             + p["c"] * np.log10(n) * np.log10(e_hat) + p["d"])
  np.testing.assert_allclose(get_law("clark").loss(p, N=n, E=e), 10 ** log10_l, rtol=1e-12)


def test_clark_transform_properties():
  e_start, e_max = 1.847, 314.478
  assert clark_expert_transform(1.0, e_start, e_max) == pytest.approx(e_start)
  assert clark_expert_transform(1e12, e_start, e_max) == pytest.approx(e_max, rel=1e-6)
  np.testing.assert_allclose(clark_expert_transform(np.array([2.0, 64.0]), 1.0, math.inf),
                             [2.0, 64.0])


def test_unknown_law_and_bad_params_are_named():
  with pytest.raises(ValueError, match=r"law = 'chinchila'.*chinchilla"):
    get_law("chinchila")
  with pytest.raises(ValueError, match=r"params of law 'chinchilla'.*\['E', 'A', 'B', 'alpha'"):
    get_law("chinchilla").loss({"E": 1.0}, N=1e9, D=1e10)
