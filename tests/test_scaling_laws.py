"""Every registered law round-trips: points drawn from known parameters plus noise are fitted back
to those parameters, and the fit predicts held-out points. Also the laws' formulas against
hand-written numpy, and Clark's expert transform against its defining properties."""
import math

import numpy as np
import pytest

from moejax.scaling import LAWS, FixedParams, fit, get_law, make_law
from moejax.scaling.laws import clark_expert_transform
from moejax.scaling.optimal import optimal_allocation
from moejax.scaling.published import CLARK_ROUTERS, clark_final_points

NOISE = 2e-3  # std of log-loss noise
# Clark's b, c and E_start trade off against each other; they separate only at lower noise.
NOISE_OF = {"clark": 3e-4}


def _grid(**axes):
  mesh = np.meshgrid(*axes.values(), indexing="ij")
  return {k: m.ravel() for k, m in zip(axes, mesh)}


# law -> (true params, variable grid, relative tolerance per parameter)
# Tolerances: about 3x the largest error of fits to noise seeds 0, 1, 2 (data from `_numpy_loss`;
# e.g. Kaplan's N_c, D_c come back within 3%, Clark's E_start within 2.3%). Dropping the -1 in
# Clark's E_hat moves E_start by 46%; flipping the sign of gamma in the fine-grained law moves
# gamma by 194%.
CASES = {
    "kaplan": ({"N_c": 8.8e13, "D_c": 5.4e13, "alpha_N": 0.076, "alpha_D": 0.095},
               _grid(N=np.geomspace(1e6, 1e10, 9), D=np.geomspace(1e7, 1e11, 9)),
               {"N_c": 0.1, "D_c": 0.1, "alpha_N": 0.01, "alpha_D": 0.01}),
    "chinchilla": ({"E": 1.8172, "A": 477.84, "B": 2143.86, "alpha": 0.3473, "beta": 0.3672},
                   _grid(N=np.geomspace(5e7, 2e10, 8), D=np.geomspace(1e9, 1e12, 8)),
                   {"E": 0.01, "A": 0.1, "B": 0.25, "alpha": 0.02, "beta": 0.03}),
    "fine_grained": (dict(LAWS["fine_grained"].published),
                     _grid(N=np.geomspace(1e8, 4e9, 5), D=np.geomspace(1e10, 2e11, 5),
                           G=np.array([1.0, 2, 4, 8, 16])),
                     {"a": 0.15, "alpha": 0.1, "b": 0.3, "beta": 0.15, "g": 0.25, "gamma": 0.25,
                      "c": 0.4}),
    "clark": (dict(LAWS["clark"].published_by_router["S-Base"]),
              _grid(N=np.geomspace(1.5e7, 1.3e9, 6), E=2.0 ** np.arange(10)),
              {"a": 0.01, "b": 0.04, "c": 0.04, "d": 0.005, "E_start": 0.08, "E_max": 0.15}),
    "joint_moe": (dict(LAWS["joint_moe"].published),
                  _grid(N=np.geomspace(1e7, 3e9, 6), D=np.geomspace(1e8, 1e11, 6),
                        E=np.array([1.0, 4, 16, 64])),
                  {"a": 0.2, "alpha": 0.06, "gamma": 0.3, "delta": 0.2, "b": 0.3, "beta": 0.1,
                   "zeta": 0.2, "omega": 0.15, "c": 0.02}),
}


def _numpy_loss(name, p, **v):
  """Each law written out in numpy from its paper's formula, independently of
  moejax.scaling.laws (which the round trip fits): the data come from here."""
  if name == "kaplan":   # Kaplan et al. (2020), Eq. (1.5)
    return ((p["N_c"] / v["N"]) ** (p["alpha_N"] / p["alpha_D"]) + p["D_c"] / v["D"]) ** p["alpha_D"]
  if name == "chinchilla":   # Hoffmann et al. (2022), Eq. (2)
    return p["E"] + p["A"] / v["N"] ** p["alpha"] + p["B"] / v["D"] ** p["beta"]
  if name == "fine_grained":   # Krajewski et al. (2024), Eq. (9)
    return (p["c"] + (p["g"] / v["G"] ** p["gamma"] + p["a"]) / v["N"] ** p["alpha"]
            + p["b"] / v["D"] ** p["beta"])
  if name == "clark":   # Clark et al. (2022), Eq. (1), base-10 logs
    l10n, l10e = np.log10(v["N"]), np.log10(_e_hat(v["E"], p["E_start"], p["E_max"]))
    return 10 ** (p["a"] * l10n + p["b"] * l10e + p["c"] * l10n * l10e + p["d"])
  if name == "joint_moe":   # Ludziejewski et al. (2025), Eq. (6), E_hat of Table 3
    le = np.log(_e_hat(v["E"], 2.0732, 290.4521))
    return (p["a"] * np.exp(p["delta"] * le) * v["N"] ** (p["alpha"] + p["gamma"] * le)
            + p["b"] * np.exp(p["omega"] * le) * v["D"] ** (p["beta"] + p["zeta"] * le) + p["c"])
  raise KeyError(name)


def test_every_registered_law_has_a_case():
  assert set(CASES) == set(LAWS) == {"kaplan", "chinchilla", "fine_grained", "clark", "joint_moe"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip(name):
  """Noisy points from the numpy formula, fitted by the law's code, give back the parameters."""
  law = get_law(name)
  truth, variables, rtol = CASES[name]
  noise = NOISE_OF.get(name, NOISE)
  rng = np.random.default_rng(0)
  loss = _numpy_loss(name, truth, **variables) * np.exp(
      noise * rng.standard_normal(len(variables["N"])))
  starts = law.start_grid()
  starts = starts[np.linspace(0, len(starts) - 1, min(len(starts), 300)).astype(int)]
  r = fit(law, {**variables, "loss": loss}, loss="squares", starts=starts, max_iter=40)
  for k, tol in rtol.items():
    assert r.params[k] == pytest.approx(truth[k], rel=tol, abs=1e-3), (k, r.params, truth)
  # Residuals at the noise level, and held-out points (between grid nodes) predicted as well.
  assert r.rmse_log < 1.3 * noise
  held_out = {k: np.sqrt(v[:-1] * v[1:]) for k, v in variables.items()}
  err = np.log(law.loss(r.params, **held_out)) - np.log(_numpy_loss(name, truth, **held_out))
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
  e_hat = _e_hat(e, 2.0732, 290.4521)  # E_start, E_max of Ludziejewski et al. (2025), Table 3
  np.testing.assert_allclose(
      get_law("joint_moe").loss(p, N=n, D=d, E=e),
      p["a"] * e_hat ** p["delta"] * n ** (p["alpha"] + p["gamma"] * np.log(e_hat))
      + p["b"] * e_hat ** p["omega"] * d ** (p["beta"] + p["zeta"] * np.log(e_hat)) + p["c"],
      rtol=1e-12)
  np.testing.assert_allclose(  # plain E on request
      make_law("joint_moe", e_start=1.0, e_max=math.inf).loss(p, N=n, D=d, E=e),
      p["a"] * e ** p["delta"] * n ** (p["alpha"] + p["gamma"] * np.log(e))
      + p["b"] * e ** p["omega"] * d ** (p["beta"] + p["zeta"] * np.log(e)) + p["c"], rtol=1e-12)
  p = CASES["clark"][0]
  e_hat = _e_hat(e, p["E_start"], p["E_max"])
  log10_l = (p["a"] * np.log10(n) + p["b"] * np.log10(e_hat)
             + p["c"] * np.log10(n) * np.log10(e_hat) + p["d"])
  np.testing.assert_allclose(get_law("clark").loss(p, N=n, E=e), 10 ** log10_l, rtol=1e-12)


def _e_hat(e, e_start, e_max):
  """E_hat written out from Eq. (4) of Ludziejewski et al. (2025), arXiv:2502.05172 (Clark et
  al.'s transform): 1/E_hat = 1/(E - 1 + (1/E_start - 1/E_max)^-1) + 1/E_max."""
  return 1.0 / (1.0 / (e - 1.0 + 1.0 / (1.0 / e_start - 1.0 / e_max)) + 1.0 / e_max)


def test_clark_transform_properties():
  e_start, e_max = 1.847, 314.478
  assert clark_expert_transform(1.0, e_start, e_max) == pytest.approx(e_start)
  assert clark_expert_transform(1e12, e_start, e_max) == pytest.approx(e_max, rel=1e-6)
  np.testing.assert_allclose(clark_expert_transform(np.array([2.0, 64.0]), 1.0, math.inf),
                             [2.0, 64.0])


def test_unknown_law_and_bad_params_are_named():
  with pytest.raises(ValueError, match=r"law` = 'chinchila'.*chinchilla"):
    get_law("chinchila")
  with pytest.raises(ValueError, match=r"params of law 'chinchilla'.*\['E', 'A', 'B', 'alpha'"):
    get_law("chinchilla").loss({"E": 1.0}, N=1e9, D=1e10)


# Ludziejewski et al. (2025), arXiv:2502.05172, Table 4: their joint law with the Table 3
# coefficients reduced to L = m N^mu + n D^nu + c at fixed E.
JOINT_MOE_TABLE4 = {1: (30.3640, -0.1817, 53.9838, -0.1965),
                    2: (27.7982, -0.1780, 66.8401, -0.2065),
                    4: (24.8462, -0.1731, 87.7022, -0.2192),
                    8: (21.8330, -0.1676, 119.9126, -0.2338),
                    16: (19.0159, -0.1617, 167.5073, -0.2494),
                    32: (16.5424, -0.1557, 234.6726, -0.2652)}


def test_joint_moe_published_fit_reproduces_the_papers_table4():
  """Table 3 through Eqs. (4) and (6) gives the paper's own per-E reductions (Table 4) to the
  rounding of Table 3 (4 digits); plain E instead of E_hat, or a flipped sign of delta/omega,
  misses them by several percent."""
  law = get_law("joint_moe")
  p = law.published
  n, d = np.meshgrid(np.geomspace(1e8, 1e10, 3), np.geomspace(1e9, 1e11, 3))
  n, d = n.ravel(), d.ravel()
  for e, (m, mu, nn, nu) in JOINT_MOE_TABLE4.items():
    expected = m * n ** mu + nn * d ** nu + p["c"]
    np.testing.assert_allclose(law.loss(p, N=n, D=d, E=e), expected, rtol=3e-3, err_msg=f"E={e}")
  plain = make_law("joint_moe", e_start=1.0, e_max=math.inf).loss(p, N=n, D=d, E=1.0)
  m, mu, nn, nu = JOINT_MOE_TABLE4[1]
  assert np.max(np.abs(plain / (m * n ** mu + nn * d ** nu + p["c"]) - 1)) > 0.02


# Ludziejewski et al. (2025), Table 1: compute-optimal (N_act, D) at budget F = 6 N_act D.
JOINT_MOE_TABLE1 = {(1e20, 1): (1.7e9, 9.7e9), (1e20, 32): (669e6, 24.9e9),
                    (1e21, 1): (5.7e9, 29.3e9), (1e21, 8): (3.8e9, 44.3e9),
                    (1e22, 1): (18.8e9, 88.6e9), (1e22, 16): (13.2e9, 126.5e9)}


@pytest.mark.parametrize("flops,experts", sorted(JOINT_MOE_TABLE1))
def test_joint_moe_published_fit_gives_the_papers_compute_optima(flops, experts):
  """The published fit, minimised under 6 N D = F at fixed E, lands on the paper's Table 1 to
  the 2-3 digits printed there."""
  law = get_law("joint_moe")
  best = optimal_allocation(law, law.published, flops, fixed={"E": float(experts)})
  n_paper, d_paper = JOINT_MOE_TABLE1[(flops, experts)]
  assert best.variables["N"] == pytest.approx(n_paper, rel=0.03)
  assert best.variables["D"] == pytest.approx(d_paper, rel=0.03)


def test_joint_moe_with_fitted_expert_transform():
  """fit_expert_transform=True adds E_start, E_max to the parameters; at the paper's values it is
  the registered law."""
  fixed = get_law("joint_moe")
  free = make_law("joint_moe", fit_expert_transform=True)
  assert free.param_names == fixed.param_names + ("E_start", "E_max")
  assert free.published == {**fixed.published, "E_start": 2.0732, "E_max": 290.4521}
  assert free.start_grid().shape[1] == len(free.raw_names) == 11
  n, d, e = np.array([3e8, 2e9]), np.array([5e9, 4e10]), np.array([1.0, 16.0])
  np.testing.assert_allclose(free.loss(free.published, N=n, D=d, E=e),
                             fixed.loss(fixed.published, N=n, D=d, E=e), rtol=1e-12)
  back = free.to_params(free.to_raw(free.published))
  assert back == pytest.approx(free.published, rel=1e-12)
  with pytest.raises(ValueError, match=r"e_start = 2.0, e_max = None are not allowed"):
    make_law("joint_moe", e_start=2.0, fit_expert_transform=True)
  with pytest.raises(ValueError, match=r"e_start = 0.5, e_max = 290.4521 are not allowed"):
    make_law("joint_moe", e_start=0.5)


@pytest.mark.parametrize("router", CLARK_ROUTERS)
def test_clark_table3_is_base10_and_fits_the_shipped_data(router):
  """Clark et al.'s Table 3 coefficients, read as base-10 logs (the law's reading), predict the
  routed runs' final losses to < 0.01 in log10 L; read as natural logs they miss by orders of
  magnitude more. Written out by hand, independently of the law's code."""
  p = get_law("clark").published_by_router[router]
  data = clark_final_points(router)
  n, e_hat = data["N"], _e_hat(data["E"], p["E_start"], p["E_max"])
  for log, tol in ((np.log10, 0.01), (np.log, None)):
    pred = p["a"] * log(n) + p["b"] * log(e_hat) + p["c"] * log(n) * log(e_hat) + p["d"]
    rmse = np.sqrt(np.mean((pred - log(data["loss"])) ** 2))
    if tol is not None:
      assert rmse < tol, (router, rmse)
      rmse_law = np.sqrt(np.mean((np.log10(get_law("clark").loss(p, N=n, E=data["E"]))
                                  - np.log10(data["loss"])) ** 2))
      assert rmse_law == pytest.approx(rmse, rel=1e-9)
    else:
      assert rmse > 0.5, (router, rmse)


def test_diverged_raw_parameters_map_to_inf_not_an_error():
  """A bootstrap resample can run a log-parameter off to ~1e3 (the direction is unidentified);
  its paper parameter is then inf, so percentile intervals read as unbounded instead of the
  whole fit crashing (seen in the sweep's fine-grained fit)."""
  p = get_law("fine_grained").to_params([0.0, 0.1, 800.0, 0.1, 0.0, 0.5, 0.0])
  assert p["b"] == math.inf and p["a"] == 1.0 and p["c"] == 1.0


def test_fixed_params_hold_a_known_term_and_fit_the_rest():
  """Chinchilla with E held at its true value: the other four come back from noisy points, E
  stays put, and the wrapper's loss equals the base law's at the full parameters."""
  base = get_law("chinchilla")
  truth = dict(CASES["chinchilla"][0])
  law = FixedParams(base, E=truth["E"])
  assert set(law.param_names) == {"A", "B", "alpha", "beta"}
  variables = CASES["chinchilla"][1]
  free = {k: v for k, v in truth.items() if k != "E"}
  np.testing.assert_allclose(law.loss(free, **variables), base.loss(truth, **variables),
                             rtol=1e-12)
  rng = np.random.default_rng(1)
  loss = base.loss(truth, **variables) * np.exp(NOISE * rng.standard_normal(len(variables["N"])))
  r = fit(law, {**variables, "loss": loss}, loss="squares")
  assert set(r.params) == set(free)
  for k in ("alpha", "beta"):
    assert r.params[k] == pytest.approx(truth[k], rel=0.05)
  with pytest.raises(ValueError, match="not allowed for law 'chinchilla'"):
    FixedParams(base, Z=1.0)


@pytest.mark.parametrize("name,fixed", [
    ("clark", {"E_max": 300.0}), ("clark", {"E_start": 3.0}),
    ("clark", {"E_start": 3.0, "E_max": 300.0}), ("joint_moe_fitted", {"E_max": 300.0}),
    ("chinchilla", {"E": 1.8172, "alpha": 0.35}), ("fine_grained", {"c": 0.47})])
def test_fixed_params_come_back_exactly_wherever_the_free_ones_go(name, fixed):
  """Every fixed parameter is the value given, as the base law's loss uses it, at every start of
  the grid (Clark's E_start from 1.4 to 8.4) and after a fit; the wrapper's loss is the base
  law's at the full parameters. (Clark's E_max used to be fixed only at the first start.)"""
  base = (make_law("joint_moe", fit_expert_transform=True) if name == "joint_moe_fitted"
          else get_law(name))
  law = FixedParams(base, **fixed)
  for raw in law.start_grid():
    used = law.base_params(raw)
    for k, v in fixed.items():
      assert used[k] == pytest.approx(v, rel=1e-14, abs=0), (k, used, raw)
  if name != "clark":
    return
  # A fit: points from Clark's law (E_start = 5, E_max = 300 unless fixed), written out in numpy.
  truth = {"a": -0.082, "b": -0.108, "c": 0.009, "d": 1.104, "E_start": 5.0, "E_max": 300.0,
           **fixed}
  variables = CASES["clark"][1]
  e_hat = _e_hat(variables["E"], truth["E_start"], truth["E_max"])
  l10n = np.log10(variables["N"])
  loss = 10 ** (truth["a"] * l10n + truth["b"] * np.log10(e_hat)
                + truth["c"] * l10n * np.log10(e_hat) + truth["d"])
  free = {k: v for k, v in truth.items() if k not in fixed}
  np.testing.assert_allclose(law.loss(free, **variables), loss, rtol=1e-12)
  r = fit(law, {**variables, "loss": loss}, loss="squares", max_iter=40)
  used = law.base_params(r.raw)
  for k, v in fixed.items():
    assert used[k] == pytest.approx(v, rel=1e-14, abs=0), (k, used)
  for k, v in free.items():
    assert r.params[k] == pytest.approx(v, rel=1e-3), (k, r.params)


def test_kaplan_published_is_the_fit_of_its_own_equation():
  """Kaplan et al. (2020) fit Eq. (1.5), the law's form, in Table 2 (Sec. 4.2); the often-quoted
  N_c = 8.8e13, D_c = 5.4e13, alpha_D = 0.095 belong to the one-variable laws (1.1), (1.2)."""
  assert get_law("kaplan").published == {"alpha_N": 0.076, "alpha_D": 0.103, "N_c": 6.4e13,
                                         "D_c": 1.8e13}
