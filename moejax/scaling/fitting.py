"""Fitting a scaling law: robust objective, L-BFGS from a grid of starts, bootstrap intervals.

The objective is that of Hoffmann et al. (2022), "Training Compute-Optimal Large Language Models"
(arXiv:2203.15556, Appendix D.2), as replicated by Besiroglu et al. (2024), "Chinchilla Scaling:
A replication attempt" (arXiv:2404.10102): the SUM over points of Huber_delta(log L_hat - log L),
minimised by L-BFGS from every start of a grid, the lowest objective kept. `loss="squares"` swaps
the Huber loss for 0.5 r^2 (least squares on log-loss).

How the grid stays fast: all starts run at once as one `jax.vmap` of optax's L-BFGS (backtracking
line search) for `max_iter` steps in float32; the `polish` best distinct end points (and the best
start itself) are then run to convergence by the same vmapped L-BFGS in float64. (scipy's
L-BFGS-B was the first choice for that stage; its OpenBLAS threads fight XLA's for the cores and
made it 4x slower on a 2-core machine.) Bootstrap resamples are points drawn
with replacement, expressed as integer weights per point, all resamples fitted in one vmapped
float64 run started from the full-data optimum. float64 is enabled only inside these functions
(`jax.enable_x64` context), never globally.

How compiles are shared: compiling one vmapped L-BFGS program costs seconds, a fit of a few
hundred points a fraction of that, and jit compiles once per shape. So the points are padded to a
few bucket sizes (`_padded_size`) with copies of the first point at weight 0, which add exact
zeros to the objective and its gradient, and the lanes (starts, polish candidates, bootstrap
resamples) to buckets too, with copies of the first lane, which run independently and are
dropped; the loss ("huber" or "squares") and delta are traced arguments. Fits of one law whose
sizes fall in the same buckets then run the same compiled programs.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moejax.scaling.laws import Law

LOSSES = ("huber", "squares")


@dataclasses.dataclass
class FitResult:
  """A fitted law (see `fit`).

  params: {paper name: value}; raw: the optimiser's vector [P]; objective: the summed robust
  loss at the optimum; rmse_log: RMSE of natural-log residuals; intervals: {paper name: (lo, hi)}
  percentile bootstrap intervals at `confidence`, or None; bootstrap: [R, P] fitted raw vectors of
  the resamples, or None.
  """
  law: Law
  params: dict[str, float]
  raw: np.ndarray
  objective: float
  rmse_log: float
  num_points: int
  num_starts: int
  loss: str
  delta: float
  intervals: dict[str, tuple[float, float]] | None = None
  bootstrap: np.ndarray | None = None
  confidence: float = 0.95

  def bootstrap_params(self) -> dict[str, np.ndarray] | None:
    """{paper name: [R] values over the bootstrap resamples}."""
    if self.bootstrap is None:
      return None
    rows = [self.law.to_params(r) for r in self.bootstrap]
    return {k: np.array([row[k] for row in rows]) for k in self.law.param_names}


def _check_data(law: Law, data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  need = list(law.variables) + ["loss"]
  missing = [k for k in need if k not in data]
  if missing:
    raise ValueError(f"data columns {sorted(data)} lack {missing}: law {law.name!r} needs {need}")
  out = {k: np.asarray(data[k], np.float64).ravel() for k in need}
  n = len(out["loss"])
  for k, v in out.items():
    if len(v) != n:
      raise ValueError(f"data column {k!r} has {len(v)} rows, expected {n} like `loss`")
    if not np.all(np.isfinite(v)) or np.any(v <= 0):
      bad = v[~(np.isfinite(v) & (v > 0))][:3]
      raise ValueError(f"data column {k!r} holds {bad.tolist()}: expected finite values > 0")
  return out


def _objective(raw, weights, logs, target, law: Law, huber, delta):
  """Summed weighted loss of log-residuals: raw [P], weights [n], logs {var: [n]}, target [n];
  Huber with `delta` where `huber` (a traced bool, so both losses share one compiled program;
  `lax.cond` runs the one chosen), 0.5 r^2 otherwise."""
  pred = law.log_loss(raw, logs)
  per_point = jax.lax.cond(huber, lambda r: optax.losses.huber_loss(r, delta=delta),
                           lambda r: 0.5 * r ** 2, pred - target)
  total = jnp.sum(weights * per_point)
  return jnp.where(jnp.isfinite(total), total, jnp.inf)


def _lbfgs(dtype):
  # The Armijo test gets a relative slack at the working precision: without it, lanes that have
  # converged fail every test and hold the whole batch in the longest line search.
  slack = 1e-6 if jnp.dtype(dtype) == jnp.float32 else 1e-13
  return optax.lbfgs(linesearch=optax.scale_by_backtracking_linesearch(
      max_backtracking_steps=10, decrease_factor=0.3, rtol=slack, store_grad=True))


# Smallest buckets (see `_padded_size`), a trade of compiles against work: points pad to 64 or
# more; the float32 stage's 40 steps to 512 starts or more; the float64 polish (up to 2,000 steps
# of at most `polish + 1` lanes) to 8 lanes or more; bootstrap resamples to 64 or more.
_MIN_POINTS, _MIN_STARTS, _MIN_LANES, _MIN_RESAMPLES = 64, 512, 8, 64


def _padded_size(k: int, minimum: int) -> int:
  """The bucket of `k` points or lanes: the next power of two >= `minimum` up to 1024, then the
  next multiple of 1024 (at most 2x the work below 1024, 1024 / k above; 4,500 starts -> 5,120)."""
  if k <= 1024:
    return max(minimum, 1 << (k - 1).bit_length())
  return -(-k // 1024) * 1024


def _pad_rows(a: np.ndarray, size: int) -> np.ndarray:
  """a [k, ...] -> [size, ...], the added rows copies of row 0."""
  a = np.asarray(a)
  return np.concatenate([a, np.repeat(a[:1], size - len(a), axis=0)])


@jax.jit
def _init_states(raws):
  # Strong types throughout (optax's init leaves a weakly typed counter, which `_run_steps`
  # returns strong): else its second call compiles it again.
  states = jax.vmap(_lbfgs(raws.dtype).init)(raws)
  return jax.tree.map(lambda x: jax.lax.convert_element_type(x, x.dtype), states)


@functools.partial(jax.jit, static_argnames=("law", "steps"))
def _run_steps(raws, states, weights, logs, target, huber, delta, *, law, steps):
  """`steps` L-BFGS iterations of every lane: raws [S, P], weights [S, n] -> (raws, states, [S])."""
  opt = _lbfgs(raws.dtype)

  def one_step(raw, state, w):
    fn = lambda r: _objective(r, w, logs, target, law, huber, delta)  # noqa: E731
    value, grad = optax.value_and_grad_from_state(fn)(raw, state=state)
    updates, state = opt.update(grad, state, raw, value=value, grad=grad, value_fn=fn)
    new = optax.apply_updates(raw, updates)
    # A start in a region where the model overflows stays put instead of turning into NaNs.
    return jnp.where(jnp.all(jnp.isfinite(new)), new, raw), state

  step = jax.vmap(one_step)
  raws, states = jax.lax.fori_loop(0, steps, lambda _, c: step(c[0], c[1], weights), (raws, states))
  values = jax.vmap(_objective, in_axes=(0, 0, None, None, None, None, None))(
      raws, weights, logs, target, law, huber, delta)
  return raws, states, values


@functools.partial(jax.jit, static_argnames=("law",))
def _values(raws, weights, logs, target, huber, delta, *, law):
  """Objectives [S] of raws [S, P] under one weight vector [n]."""
  return jax.vmap(lambda r: _objective(r, weights, logs, target, law, huber, delta))(raws)


_log_loss = jax.jit(lambda raw, logs, law: law.log_loss(raw, logs), static_argnames=("law",))


def _batched_lbfgs(starts: np.ndarray, weights: np.ndarray, logs, target, statics: dict, *,
                   max_iter: int, dtype, min_lanes: int = _MIN_LANES, chunk: int = 10,
                   ftol: float = 1e-10):
  """Runs L-BFGS from every start at once (one vmapped optax L-BFGS).

  starts: [S, P]; weights: [S, n]. Returns (end points [S, P], objectives [S]) as numpy. Steps in
  chunks of `chunk` iterations; stops early once no objective changed by more than `ftol`
  (relative) over a chunk. The lanes run padded to `_padded_size(S, min_lanes)` with copies of
  lane 0 (one compiled program serves every S in a bucket); a lane's steps depend on it alone.
  """
  s = len(starts)
  lanes = _padded_size(s, min_lanes)
  w = jnp.asarray(_pad_rows(weights, lanes), dtype)
  raws = jnp.asarray(_pad_rows(starts, lanes), dtype)
  states = _init_states(raws)
  previous = np.full(s, np.inf)
  values = previous
  for _ in range(max(1, math.ceil(max_iter / chunk))):
    raws, states, values = _run_steps(raws, states, w, logs, target, statics["loss"] == "huber",
                                      jnp.asarray(statics["delta"], dtype), law=statics["law"],
                                      steps=chunk)
    values = np.asarray(values, np.float64)[:s]
    change = np.abs(previous - values) / np.maximum(np.abs(values), 1e-30)
    if np.all(change[np.isfinite(values)] < ftol):
      break
    previous = values
  return np.asarray(raws, np.float64)[:s], values


def _distinct_best(raws: np.ndarray, values: np.ndarray, k: int) -> list[int]:
  """Indices of the k lowest finite objectives whose end points differ (rel. 1e-4)."""
  order = [i for i in np.argsort(values) if np.isfinite(values[i])]
  chosen: list[int] = []
  for i in order:
    if all(np.max(np.abs(raws[i] - raws[j]) / (1e-8 + np.abs(raws[j]))) > 1e-4 for j in chosen):
      chosen.append(i)
    if len(chosen) == k:
      break
  return chosen


def fit(law: Law, data: Mapping[str, np.ndarray], *, loss: str = "huber", delta: float = 1e-3,
        starts: np.ndarray | None = None, max_iter: int = 40, polish: int = 4, polish_iter: int = 2000,
        bootstrap: int = 0, confidence: float = 0.95, bootstrap_iter: int = 200,
        seed: int = 0) -> FitResult:
  """Fits `law` to `data` by the procedure of Hoffmann et al. (2022), arXiv:2203.15556, App. D.2,
  as replicated by Besiroglu et al. (2024), arXiv:2404.10102 (see the module docstring).

  Args:
    law: a registered law (`moejax.scaling.laws.get_law`).
    data: {variable: [n] values > 0} for each of `law.variables`, and `loss` [n].
    loss: "huber" (Huber with `delta` on log-loss residuals, summed) or "squares".
    starts: [S, P] raw starts; default `law.start_grid()`.
    max_iter: L-BFGS iterations of the vectorised float32 stage over all starts.
    polish: how many of its best distinct end points are run to convergence in float64 (at
      most `polish_iter` iterations).
    bootstrap: number of resamples (0: no intervals).
  """
  if loss == "huber" and not delta > 0:
    raise ValueError(f"delta = {delta!r} is not allowed: expected a number > 0")
  if bootstrap < 0:
    raise ValueError(f"bootstrap = {bootstrap!r} is not allowed: expected an integer >= 0")
  if not 0 < confidence < 1:
    raise ValueError(f"confidence = {confidence!r} is not allowed: expected 0 < confidence < 1")
  cols = _check_data(law, data)
  n = len(cols["loss"])
  starts = law.start_grid() if starts is None else np.atleast_2d(np.asarray(starts, np.float64))
  if starts.shape[1] != len(law.raw_names):
    raise ValueError(f"starts have {starts.shape[1]} columns, expected {len(law.raw_names)} "
                     f"({list(law.raw_names)})")

  if loss not in LOSSES:
    raise ValueError(f"loss = {loss!r} is not allowed: expected one of {LOSSES}")
  statics = {"law": law, "loss": loss, "delta": float(delta)}

  # Points padded to their bucket with copies of point 0 at weight 0 (see the module docstring).
  num_padded = _padded_size(n, _MIN_POINTS)
  padded = {k: _pad_rows(v, num_padded) for k, v in cols.items()}

  def arrays(dtype):
    logs = {k: jnp.asarray(np.log(padded[k]), dtype) for k in law.variables}
    return logs, jnp.asarray(np.log(padded["loss"]), dtype)

  real = np.zeros(num_padded)   # weight 1 on the data, 0 on the padding
  real[:n] = 1.0
  # Stage 1, float32: every start, vectorised.
  raws, values = _batched_lbfgs(starts, np.broadcast_to(real, (len(starts), num_padded)),
                                *arrays(jnp.float32), statics, max_iter=max_iter,
                                dtype=jnp.float32, min_lanes=_MIN_STARTS)
  with jax.enable_x64(True):
    logs, target = arrays(jnp.float64)
    w64 = jnp.asarray(real, jnp.float64)
    # Stage 2, float64: the best distinct end points to convergence; plus the best raw start, so a
    # grid that already holds the optimum is never made worse by the float32 stage.
    padded_starts = _pad_rows(starts, _padded_size(len(starts), _MIN_STARTS))
    start_values = np.asarray(_values(jnp.asarray(padded_starts, jnp.float64), w64, logs, target,
                                      loss == "huber", jnp.asarray(delta, jnp.float64),
                                      law=law))[:len(starts)]
    candidates = [raws[i] for i in _distinct_best(raws, values, polish)]
    if np.isfinite(start_values).any():
      candidates.append(starts[int(np.argmin(np.where(np.isfinite(start_values), start_values,
                                                      np.inf)))])
    if not candidates:
      raise RuntimeError(f"law {law.name!r}: no start reached a finite objective")
    polished, polished_values = _batched_lbfgs(
        np.stack(candidates), np.broadcast_to(real, (len(candidates), num_padded)), logs, target,
        statics, max_iter=polish_iter, dtype=jnp.float64, ftol=1e-15)
    i = int(np.argmin(np.where(np.isfinite(polished_values), polished_values, np.inf)))
    best_raw, best_val = polished[i], float(polished_values[i])
    resid = (np.asarray(_log_loss(jnp.asarray(best_raw), logs, law=law))[:n]
             - np.log(cols["loss"]))
    result = FitResult(law=law, params=law.to_params(best_raw), raw=best_raw, objective=best_val,
                       rmse_log=float(np.sqrt(np.mean(resid ** 2))), num_points=n,
                       num_starts=len(starts), loss=loss, delta=delta, confidence=confidence)
    if bootstrap:
      rng = np.random.default_rng(seed)
      weights = np.zeros((bootstrap, num_padded))
      weights[:, :n] = rng.multinomial(n, np.full(n, 1.0 / n), size=bootstrap)
      boot_raws, boot_vals = _batched_lbfgs(np.tile(best_raw, (bootstrap, 1)), weights, logs,
                                            target, statics, max_iter=bootstrap_iter,
                                            dtype=jnp.float64, min_lanes=_MIN_RESAMPLES)
      result.bootstrap = boot_raws[np.isfinite(boot_vals)]
      samples = result.bootstrap_params()
      q = 100 * np.array([(1 - confidence) / 2, (1 + confidence) / 2])
      result.intervals = {k: tuple(float(x) for x in np.percentile(v, q))
                          for k, v in samples.items()}
  return result
