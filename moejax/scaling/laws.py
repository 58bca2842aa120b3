"""Scaling-law forms, registered by name.

Every law predicts log L from the logs of its variables, written as a log-sum-exp of terms where it
can be: the form of Hoffmann et al. (2022) that keeps fits in a numerically safe parameterisation.
A law has two parameter vectors:
- `params`: a dict with the names of the paper's formula (Chinchilla: E, A, B, alpha, beta);
- `raw`: the vector the optimiser moves (logs of positive coefficients), `raw_names` says which.
`log_loss(raw, logx)` is written with jax.numpy so the fitter can vmap and differentiate it; it runs
in whatever precision its inputs have.
"""
from __future__ import annotations

import itertools
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from moejax.registry import Registry

LAWS = Registry("law")


def register(cls):
  """Class decorator: adds an instance of `cls` to `LAWS` under `cls.name`."""
  LAWS.register(cls.name, cls())
  return cls


def get_law(name: str) -> "Law":
  """The registered law called `name`; raises ConfigError (a ValueError) naming the allowed
  names otherwise."""
  return LAWS[name]


def _exp(x: float) -> float:
  """exp(x) of a raw log-parameter; inf past float64's range (a diverged bootstrap fit) rather
  than OverflowError, so intervals can say "unbounded"."""
  return math.inf if x > 709.0 else math.exp(x)


def _lse(*terms):
  shape = jnp.broadcast_shapes(*(jnp.shape(t) for t in terms))
  return jax.nn.logsumexp(jnp.stack([jnp.broadcast_to(t, shape) for t in terms]), axis=0)


class Law:
  """Base class of a scaling law; subclasses set the class attributes and three methods."""
  name: str = ""
  variables: tuple[str, ...] = ()    # inputs besides the loss, e.g. ("N", "D")
  param_names: tuple[str, ...] = ()  # as in the paper's formula
  raw_names: tuple[str, ...] = ()    # what the optimiser moves
  formula: str = ""
  paper: str = ""
  arxiv: str = ""
  published: Mapping[str, float] | None = None  # a published fit, where one is checked
  start_values: Mapping[str, tuple[float, ...]] = {}  # grid of starts, per raw name

  def to_params(self, raw) -> dict[str, float]:
    """Raw vector [P] -> {paper name: value}."""
    raise NotImplementedError

  def to_raw(self, params: Mapping[str, float]) -> np.ndarray:
    """{paper name: value} -> raw vector [P]."""
    raise NotImplementedError

  def log_loss(self, raw, logx: Mapping[str, jnp.ndarray]):
    """Predicted log L [n] from raw [P] and the natural logs of the variables, each [n]."""
    raise NotImplementedError

  def start_grid(self) -> np.ndarray:
    """Starts [S, P]: the Cartesian product of `start_values` in `raw_names` order."""
    return np.array(list(itertools.product(*(self.start_values[n] for n in self.raw_names))),
                    dtype=np.float64)

  def loss(self, params: Mapping[str, float], **variables) -> np.ndarray:
    """Predicted loss for `variables` (natural units, broadcastable arrays), in float64."""
    missing = [v for v in self.variables if v not in variables]
    if missing:
      raise ValueError(f"variables of law {self.name!r} = {sorted(variables)} lack {missing}: "
                       f"expected {list(self.variables)}")
    with jax.enable_x64(True):
      logx = {k: jnp.log(jnp.asarray(variables[k], jnp.float64)) for k in self.variables}
      raw = jnp.asarray(self.to_raw(params), jnp.float64)
      return np.exp(np.asarray(self.log_loss(raw, logx)))

  def tie_fixed(self, raw: list, fixed: Mapping[str, float], xp) -> list:
    """The raw coordinates [P] (a list of scalars, numpy or jax by `xp`) with those of the
    `fixed` paper parameters made consistent with the others, for `FixedParams`.

    By default each parameter's coordinate depends on that parameter alone, so the constant
    coordinate `FixedParams` put in place is already right. Laws whose coordinates couple
    parameters (Clark's E_max = E_start + exp(t)) override this.
    """
    del fixed, xp
    return raw

  def check_params(self, params: Mapping[str, float]) -> None:
    """Raises ValueError unless `params` has exactly the paper's names."""
    if set(params) != set(self.param_names):
      raise ValueError(f"params of law {self.name!r} = {sorted(params)} are not allowed: "
                       f"expected the names {list(self.param_names)}")


@register
class Kaplan(Law):
  """Kaplan et al. (2020), "Scaling Laws for Neural Language Models", arXiv:2001.08361, Eq. (1.5):

      L(N, D) = [ (N_c / N)^(alpha_N / alpha_D) + D_c / D ]^alpha_D

  N non-embedding parameters, D tokens. Published fit of this equation: their Table 2 ("Fits to
  L(N, D)", Sec. 4.2): alpha_N = 0.076, alpha_D = 0.103, N_c = 6.4e13, D_c = 1.8e13. The values
  often quoted with it, alpha_N = 0.076, N_c = 8.8e13 and alpha_D = 0.095, D_c = 5.4e13, are
  the one-variable fits L(N) and L(D) of their Eqs. (1.1) and (1.2) (Sec. 1.2); the paper notes
  the two sets differ because Table 2 fits the full L(N, D). Checked against the paper's text
  (Sec. 1.2, Sec. 4.2 and Table 2).
  """
  name = "kaplan"
  variables = ("N", "D")
  param_names = ("N_c", "D_c", "alpha_N", "alpha_D")
  raw_names = ("log_N_c", "log_D_c", "alpha_N", "alpha_D")
  formula = "L = [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D"
  paper, arxiv = "Scaling Laws for Neural Language Models", "2001.08361"
  published = {"N_c": 6.4e13, "D_c": 1.8e13, "alpha_N": 0.076, "alpha_D": 0.103}   # Table 2
  start_values = {"log_N_c": (20.0, 26.0, 32.0, 38.0), "log_D_c": (20.0, 26.0, 32.0, 38.0),
                  "alpha_N": (0.03, 0.1, 0.3), "alpha_D": (0.03, 0.1, 0.3)}

  def to_params(self, raw):
    r = [float(x) for x in np.asarray(raw, np.float64)]
    return {"N_c": _exp(r[0]), "D_c": _exp(r[1]), "alpha_N": r[2], "alpha_D": r[3]}

  def to_raw(self, params):
    self.check_params(params)
    p = params
    return np.array([math.log(p["N_c"]), math.log(p["D_c"]), p["alpha_N"], p["alpha_D"]])

  def log_loss(self, raw, logx):
    log_nc, log_dc, a_n, a_d = raw[0], raw[1], raw[2], raw[3]
    return a_d * _lse((a_n / a_d) * (log_nc - logx["N"]), log_dc - logx["D"])


@register
class Chinchilla(Law):
  """Hoffmann et al. (2022), "Training Compute-Optimal Large Language Models", arXiv:2203.15556,
  Approach 3, fitted in the log-sum-exp form of their Appendix D.2:

      L(N, D) = E + A / N^alpha + B / D^beta
      log L   = LSE(a - alpha log N, b - beta log D, e),  A = e^a, B = e^b, E = e^e

  The default start grid is Besiroglu et al. (2024), "Chinchilla Scaling: A replication attempt",
  arXiv:2404.10102: alpha, beta in {0, 0.5, ..., 2}; e in {-1, -0.5, ..., 1}; a, b in
  {0, 5, ..., 25} (4,500 starts). Their fit: E = 1.8172, A = 477.84, B = 2143.86,
  alpha = 0.3473, beta = 0.3672.
  """
  name = "chinchilla"
  variables = ("N", "D")
  param_names = ("E", "A", "B", "alpha", "beta")
  raw_names = ("e", "a", "b", "alpha", "beta")
  formula = "L = E + A/N^alpha + B/D^beta"
  paper, arxiv = "Training Compute-Optimal Large Language Models", "2203.15556"
  published = {"E": 1.8172, "A": 477.84, "B": 2143.86, "alpha": 0.3473, "beta": 0.3672}
  start_values = {"e": (-1.0, -0.5, 0.0, 0.5, 1.0), "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
                  "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0), "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
                  "beta": (0.0, 0.5, 1.0, 1.5, 2.0)}

  def to_params(self, raw):
    r = [float(x) for x in np.asarray(raw, np.float64)]
    return {"E": _exp(r[0]), "A": _exp(r[1]), "B": _exp(r[2]), "alpha": r[3],
            "beta": r[4]}

  def to_raw(self, params):
    self.check_params(params)
    p = params
    return np.array([math.log(p["E"]), math.log(p["A"]), math.log(p["B"]), p["alpha"], p["beta"]])

  def log_loss(self, raw, logx):
    e, a, b, alpha, beta = (raw[i] for i in range(5))
    return _lse(a - alpha * logx["N"], b - beta * logx["D"], e)


@register
class FineGrained(Law):
  """Krajewski et al. (2024), "Scaling Laws for Fine-Grained Mixture of Experts", arXiv:2402.07871,
  Eq. (9), with granularity G (expert width d_ff / G):

      L(N, D, G) = c + (g / G^gamma + a) / N^alpha + b / D^beta
      log L = LSE(log c, log g - gamma log G - alpha log N, log a - alpha log N, log b - beta log D)

  N is the total number of non-embedding parameters, D training tokens, G = d_ff / d_expert; their
  runs fix the expansion rate E = 64 (Sec. 5), so the fit holds for E = 64 only.
  Their Table 1 (Sec. 5.4), MoE row, fitted with a Huber loss (delta = 0.1) and BFGS, RMSE 0.015:
  a = 18.1, alpha = 0.115, b = 30.8, beta = 0.147, g = 2.1, gamma = 0.58, c = 0.47 (dense row, for
  Eq. 1 with the same c: a = 16.3, alpha = 0.126, b = 26.7, beta = 0.127). Verified against the
  paper's text (Eq. 9, Sec. 5.3; Table 1, Sec. 5.4).
  """
  name = "fine_grained"
  variables = ("N", "D", "G")
  param_names = ("a", "alpha", "b", "beta", "g", "gamma", "c")
  raw_names = ("log_a", "alpha", "log_b", "beta", "log_g", "gamma", "log_c")
  formula = "L = c + (g/G^gamma + a)/N^alpha + b/D^beta"
  paper, arxiv = "Scaling Laws for Fine-Grained Mixture of Experts", "2402.07871"
  published = {"a": 18.1, "alpha": 0.115, "b": 30.8, "beta": 0.147, "g": 2.1, "gamma": 0.58,
               "c": 0.47}
  start_values = {"log_a": (0.0, 3.0, 6.0), "alpha": (0.1, 0.3, 0.6), "log_b": (0.0, 3.0, 6.0),
                  "beta": (0.1, 0.3, 0.6), "log_g": (-1.0, 1.0, 3.0), "gamma": (0.2, 0.6, 1.2),
                  "log_c": (-1.5, -0.5, 0.5)}

  def to_params(self, raw):
    r = [float(x) for x in np.asarray(raw, np.float64)]
    return {"a": _exp(r[0]), "alpha": r[1], "b": _exp(r[2]), "beta": r[3],
            "g": _exp(r[4]), "gamma": r[5], "c": _exp(r[6])}

  def to_raw(self, params):
    self.check_params(params)
    p = params
    return np.array([math.log(p["a"]), p["alpha"], math.log(p["b"]), p["beta"], math.log(p["g"]),
                     p["gamma"], math.log(p["c"])])

  def log_loss(self, raw, logx):
    log_a, alpha, log_b, beta, log_g, gamma, log_c = (raw[i] for i in range(7))
    ln, ld, lg = logx["N"], logx["D"], logx["G"]
    return _lse(log_c, log_g - gamma * lg - alpha * ln, log_a - alpha * ln, log_b - beta * ld)


def _tie_e_max(raw: list, fixed: Mapping[str, float], i_start: int, i_max: int, xp) -> list:
  """With E_max fixed, its coordinate t = log(E_max - E_start) follows the current E_start =
  1 + exp(raw[i_start]) (NaN once E_start >= E_max, which the fitter scores as inf)."""
  if "E_max" not in fixed:
    return raw
  raw = list(raw)
  raw[i_max] = xp.log(fixed["E_max"] - (1.0 + xp.exp(raw[i_start])))
  return raw


def clark_expert_transform(num_experts, e_start, e_max):
  """Saturating expert count of Clark et al. (2022), "Unified Scaling Laws for Routed Language
  Models", arXiv:2202.01169:

      1 / E_hat = 1 / (E - 1 + (1/E_start - 1/E_max)^-1) + 1 / E_max

  E_hat(1) = E_start, E_hat grows like E for E_start << E << E_max and saturates at E_max.
  Works on numpy or jax arrays. E_start = 1 and E_max = inf give E_hat = E. The same equation is
  Eq. (4) of Ludziejewski et al. (2025), arXiv:2502.05172, which quotes it from Clark et al.
  (checked against that paper's text; Clark et al.'s own text was not reachable here).
  """
  inv_gap = 1.0 / e_start - 1.0 / e_max
  return 1.0 / (1.0 / (num_experts - 1.0 + 1.0 / inv_gap) + 1.0 / e_max)


@register
class Clark(Law):
  """Clark et al. (2022), "Unified Scaling Laws for Routed Language Models", arXiv:2202.01169,
  Eq. (1) with their saturating transform of the expert count (see `clark_expert_transform`):

      log10 L(N, E) = a log10 N + b log10 E_hat + c log10 N log10 E_hat + d

  N dense (per-token) parameters, E experts; fitted at a fixed token budget (130B tokens in the
  paper). Raw: E_start = 1 + exp(s), E_max = E_start + exp(t), keeping 1 < E_start < E_max.
  Table 3 of the paper, S-BASE: a = -0.082, b = -0.108, c = 0.009, d = 1.104, E_start = 1.847,
  E_max = 314.478; RL-R: -0.083, -0.126, 0.012, 1.111, 1.880, 469.982; HASH: -0.087, -0.136,
  0.012, 1.157, 4.175, 477.741.
  NOT VERIFIED against Clark et al.'s own text, which was not reachable here: these values come
  from a secondary transcription. Corroborated: the bilinear form and E_hat by Ludziejewski et al.
  (2025, arXiv:2502.05172, Eqs. 3-4) and Krajewski et al. (2024, arXiv:2402.07871, Eq. 2, whose
  10^(d/a) implies base-10 logs); the values fit the shipped Clark data to 0.0037-0.0077 RMSE
  in log10 L, which a natural-log reading of them would not (tests/test_scaling_laws.py).
  """
  name = "clark"
  variables = ("N", "E")
  param_names = ("a", "b", "c", "d", "E_start", "E_max")
  raw_names = ("a", "b", "c", "d", "log_E_start_minus_1", "log_E_max_minus_E_start")
  formula = "log10 L = a log10 N + b log10 E_hat + c log10 N log10 E_hat + d"
  paper, arxiv = "Unified Scaling Laws for Routed Language Models", "2202.01169"
  published_by_router = {
      "S-Base": {"a": -0.082, "b": -0.108, "c": 0.009, "d": 1.104, "E_start": 1.847,
                 "E_max": 314.478},
      "RL-R": {"a": -0.083, "b": -0.126, "c": 0.012, "d": 1.111, "E_start": 1.880,
               "E_max": 469.982},
      "Hash": {"a": -0.087, "b": -0.136, "c": 0.012, "d": 1.157, "E_start": 4.175,
               "E_max": 477.741},
  }
  start_values = {"a": (-0.12, -0.06), "b": (-0.2, -0.1, 0.0), "c": (0.0, 0.01, 0.02),
                  "d": (0.8, 1.2), "log_E_start_minus_1": (-1.0, 0.5, 2.0),
                  "log_E_max_minus_E_start": (4.0, 6.0, 8.0)}

  def to_params(self, raw):
    r = [float(x) for x in np.asarray(raw, np.float64)]
    e_start = 1.0 + _exp(r[4])
    return {"a": r[0], "b": r[1], "c": r[2], "d": r[3], "E_start": e_start,
            "E_max": e_start + _exp(r[5])}

  def to_raw(self, params):
    self.check_params(params)
    p = params
    if not 1.0 < p["E_start"] < p["E_max"]:
      raise ValueError(f"clark params E_start = {p['E_start']}, E_max = {p['E_max']} are not "
                       "allowed: expected 1 < E_start < E_max")
    return np.array([p["a"], p["b"], p["c"], p["d"], math.log(p["E_start"] - 1.0),
                     math.log(p["E_max"] - p["E_start"])])

  def tie_fixed(self, raw, fixed, xp):
    return _tie_e_max(raw, fixed, 4, 5, xp)

  def log_loss(self, raw, logx):
    a, b, c, d = raw[0], raw[1], raw[2], raw[3]
    e_start = 1.0 + jnp.exp(raw[4])
    e_max = e_start + jnp.exp(raw[5])
    e_hat = clark_expert_transform(jnp.exp(logx["E"]), e_start, e_max)
    ln10 = math.log(10.0)
    l10n, l10e = logx["N"] / ln10, jnp.log(e_hat) / ln10
    return ln10 * (a * l10n + b * l10e + c * l10n * l10e + d)


@register
class JointMoE(Law):
  """Ludziejewski et al. (2025), "Joint MoE Scaling Laws: Mixture of Experts Can Be Memory
  Efficient", arXiv:2502.05172, Eq. (6) (= Eq. 1) with E_hat of their Eq. (4), which is Clark et
  al.'s saturating transform (`clark_expert_transform`):

      L(N, D, E) = a E_hat^delta N^(alpha + gamma ln E_hat) + b E_hat^omega D^(beta + zeta ln E_hat) + c
      log L = LSE(log a + delta ln E_hat + (alpha + gamma ln E_hat) log N,
                  log b + omega ln E_hat + (beta + zeta ln E_hat) log D, log c)

  N active parameters including embedding and unembedding (their App. A.1), D training tokens, E
  experts (Switch layers, top-1, experts as wide as the dense FFN). The exponents carry their
  signs, so alpha, beta < 0. Their Table 3 (App. B): a = 35.91, alpha = -0.1889,
  delta = -0.2285, gamma = 0.0098, b = 35.98, beta = -0.1775, omega = 0.5529, zeta = -0.0259,
  E_start = 2.0732, E_max = 290.4521, c = 1.3637 (Huber delta = 0.01 on log L, L-BFGS, a, b, c
  in log space; RMSE 0.0062 train, 0.0039 held out, Sec. 5.2). Verified against the paper's text:
  the form (Eqs. 1, 4, 6, Sec. 3) and Table 3, which reproduces their Table 4 (m, mu, n, nu per E)
  and Table 1 (compute-optimal N, D) in tests/test_scaling_laws.py.

  E_start and E_max are fitted in the paper. Here they are constants of the instance, by default
  the paper's (the registered law), so `param_names` are the 9 others; JointMoE(e_start=1,
  e_max=inf) uses plain E. JointMoE(fit_expert_transform=True) (or make_law("joint_moe",
  fit_expert_transform=True)) fits them too, as `Clark` does: E_start = 1 + exp(s),
  E_max = E_start + exp(t).
  """
  name = "joint_moe"
  variables = ("N", "D", "E")
  param_names = ("a", "alpha", "gamma", "delta", "b", "beta", "zeta", "omega", "c")
  raw_names = ("log_a", "alpha", "gamma", "delta", "log_b", "beta", "zeta", "omega", "log_c")
  formula = ("L = a E^delta N^(alpha + gamma ln E) + b E^omega D^(beta + zeta ln E) + c"
             "  (E meaning E_hat(E; E_start, E_max))")
  paper = "Joint MoE Scaling Laws: Mixture of Experts Can Be Memory Efficient"
  arxiv = "2502.05172"
  published = {"a": 35.91, "alpha": -0.1889, "gamma": 0.0098, "delta": -0.2285, "b": 35.98,
               "beta": -0.1775, "zeta": -0.0259, "omega": 0.5529, "c": 1.3637}
  published_expert_transform = {"E_start": 2.0732, "E_max": 290.4521}
  start_values = {"log_a": (2.0, 5.0), "alpha": (-0.4, -0.15), "gamma": (0.0,),
                  "delta": (-0.5, 0.0, 0.5), "log_b": (2.0, 5.0), "beta": (-0.4, -0.15),
                  "zeta": (0.0,), "omega": (-0.5, 0.0, 0.5), "log_c": (-0.5, 0.5)}
  _transform_starts = {"log_E_start_minus_1": (-1.0, 1.0), "log_E_max_minus_E_start": (4.0, 6.0)}

  def __init__(self, e_start: float | None = None, e_max: float | None = None,
               fit_expert_transform: bool = False):
    self.fit_expert_transform = bool(fit_expert_transform)
    if self.fit_expert_transform:
      if e_start is not None or e_max is not None:
        raise ValueError(f"e_start = {e_start!r}, e_max = {e_max!r} are not allowed with "
                         "fit_expert_transform=True: expected None (they are fitted)")
      self.e_start = self.e_max = None
      cls = type(self)
      self.param_names = cls.param_names + ("E_start", "E_max")
      self.raw_names = cls.raw_names + tuple(cls._transform_starts)
      self.start_values = {**cls.start_values, **cls._transform_starts}
      self.published = {**cls.published, **cls.published_expert_transform}
      return
    e_start = self.published_expert_transform["E_start"] if e_start is None else float(e_start)
    e_max = self.published_expert_transform["E_max"] if e_max is None else float(e_max)
    if not 1.0 <= e_start < e_max:
      raise ValueError(f"e_start = {e_start!r}, e_max = {e_max!r} are not allowed: expected "
                       "1 <= e_start < e_max (e_max may be inf)")
    self.e_start, self.e_max = e_start, e_max

  def to_params(self, raw):
    r = [float(x) for x in np.asarray(raw, np.float64)]
    out = {"a": _exp(r[0]), "alpha": r[1], "gamma": r[2], "delta": r[3], "b": _exp(r[4]),
           "beta": r[5], "zeta": r[6], "omega": r[7], "c": _exp(r[8])}
    if self.fit_expert_transform:
      out["E_start"] = 1.0 + _exp(r[9])
      out["E_max"] = out["E_start"] + _exp(r[10])
    return out

  def to_raw(self, params):
    self.check_params(params)
    p = params
    raw = [math.log(p["a"]), p["alpha"], p["gamma"], p["delta"], math.log(p["b"]), p["beta"],
           p["zeta"], p["omega"], math.log(p["c"])]
    if self.fit_expert_transform:
      if not 1.0 < p["E_start"] < p["E_max"]:
        raise ValueError(f"joint_moe params E_start = {p['E_start']}, E_max = {p['E_max']} are "
                         "not allowed: expected 1 < E_start < E_max")
      raw += [math.log(p["E_start"] - 1.0), math.log(p["E_max"] - p["E_start"])]
    return np.array(raw)

  def tie_fixed(self, raw, fixed, xp):
    return _tie_e_max(raw, fixed, 9, 10, xp) if self.fit_expert_transform else raw

  def log_loss(self, raw, logx):
    log_a, alpha, gamma, delta, log_b, beta, zeta, omega, log_c = (raw[i] for i in range(9))
    if self.fit_expert_transform:
      e_start = 1.0 + jnp.exp(raw[9])
      e_max = e_start + jnp.exp(raw[10])
      le = jnp.log(clark_expert_transform(jnp.exp(logx["E"]), e_start, e_max))
    elif self.e_start == 1.0 and math.isinf(self.e_max):
      le = logx["E"]
    else:
      le = jnp.log(clark_expert_transform(jnp.exp(logx["E"]), self.e_start, self.e_max))
    return _lse(log_a + delta * le + (alpha + gamma * le) * logx["N"],
                log_b + omega * le + (beta + zeta * le) * logx["D"], log_c)


class FixedParams(Law):
  """`law` with some paper parameters held at given values; the fit moves the others.

  For a term known independently of the fit, e.g. the irreducible loss E of Chinchilla or c of
  the fine-grained law when the data's entropy is known (Hoffmann et al. 2022, arXiv:2203.15556,
  Sec. 3.3 discuss E as the entropy of natural text). Each fixed parameter must map to one raw
  coordinate (the raw vector lists the parameters in the same order, as every registered law
  does for its own parameters); where a raw coordinate couples parameters (Clark's and joint_moe's
  E_max = E_start + exp(t)), `Law.tie_fixed` recomputes it from the free ones at every
  evaluation, so a fixed E_max stays E_max whatever E_start the fit moves to. `params`,
  `to_params` and `to_raw` speak of the free parameters only; `fixed` holds the others.
  """

  def __init__(self, law: Law, **fixed: float):
    bad = [k for k in fixed if k not in law.param_names]
    if bad or not fixed:
      raise ValueError(f"fixed parameters {sorted(fixed)} are not allowed for law {law.name!r}: "
                       f"expected a non-empty subset of {list(law.param_names)}")
    if len(law.param_names) != len(law.raw_names):
      raise ValueError(f"law {law.name!r} has {len(law.raw_names)} raw coordinates for "
                       f"{len(law.param_names)} parameters: fixing parameters needs one each")
    self.base, self.fixed = law, {k: float(v) for k, v in fixed.items()}
    fixed_idx = [law.param_names.index(k) for k in fixed]
    self._free_idx = np.array([i for i in range(len(law.raw_names)) if i not in fixed_idx])
    full = {**law.to_params(law.start_grid()[0]), **self.fixed}
    self._fixed_idx = np.array(fixed_idx)
    self._fixed_raw = law.to_raw(full)[self._fixed_idx]
    self.name = law.name
    self.variables = law.variables
    self.param_names = tuple(law.param_names[i] for i in self._free_idx)
    self.raw_names = tuple(law.raw_names[i] for i in self._free_idx)
    self.start_values = {k: law.start_values[k] for k in self.raw_names}
    self.formula = law.formula + " with " + ", ".join(f"{k} = {v:g}" for k, v in fixed.items())
    self.paper, self.arxiv = law.paper, law.arxiv

  def _full(self, raw):
    """Free raw [P_free] -> the base law's raw [P] (numpy or jax; no scatter, so it traces the
    same in float32 and float64)."""
    xp = np if isinstance(raw, np.ndarray) else jnp
    free = {int(i): j for j, i in enumerate(self._free_idx)}
    fixed = {int(i): float(v) for i, v in zip(self._fixed_idx, self._fixed_raw)}
    full = [raw[free[i]] if i in free else xp.asarray(fixed[i], raw.dtype)
            for i in range(len(self.base.raw_names))]
    # Coupled coordinates (Clark's E_max) follow the free ones, so the fixed value holds exactly.
    full = self.base.tie_fixed(full, self.fixed, xp)
    return xp.stack([xp.asarray(v, raw.dtype) for v in full])

  def to_params(self, raw):
    p = self.base.to_params(self._full(np.asarray(raw, np.float64)))
    return {k: p[k] for k in self.param_names}

  def base_params(self, raw) -> dict[str, float]:
    """Free raw [P_free] -> all of the base law's parameters as its loss uses them (the fixed
    ones equal `fixed` up to float64 rounding)."""
    return self.base.to_params(self._full(np.asarray(raw, np.float64)))

  def to_raw(self, params):
    self.check_params(params)
    return self.base.to_raw({**params, **self.fixed})[self._free_idx]

  def log_loss(self, raw, logx):
    return self.base.log_loss(self._full(raw), logx)


def make_law(name: str, **kwargs) -> Law:
  """A fresh instance of law `name` with constructor arguments (e.g. joint_moe's E_hat constants)."""
  return type(get_law(name))(**kwargs)

