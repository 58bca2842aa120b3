"""The Epoch reproduction: Besiroglu et al. (2024), "Chinchilla Scaling: A replication attempt",
arXiv:2404.10102, refit Hoffmann et al.'s Approach 3 on 240 points with a 4,500-start L-BFGS grid
and published A = 477.84, B = 2143.86, E = 1.8172, alpha = 0.3473, beta = 0.3672 (objective
0.0010182740). Plus the fitter's bootstrap and argument checks."""
import numpy as np
import pytest

from moejax.scaling import fit, get_law
from moejax.scaling.published import chinchilla_epoch

PUBLISHED = {"A": 477.84, "B": 2143.86, "E": 1.8172, "alpha": 0.3473, "beta": 0.3672}
RTOL = {"E": 1e-3, "alpha": 1e-3, "beta": 1e-3, "A": 1e-2, "B": 2e-2}


@pytest.fixture(scope="module")
def epoch_fit():
  return fit(get_law("chinchilla"), chinchilla_epoch())


def test_epoch_data_is_the_240_points():
  d = chinchilla_epoch()
  assert len(d["loss"]) == 240
  np.testing.assert_allclose(d["D"], d["C"] / (6 * d["N"]))


def test_epoch_reproduction(epoch_fit):
  r = epoch_fit
  assert r.num_starts == 4500
  assert r.objective == pytest.approx(0.0010182740, rel=1e-6)
  for k, tol in RTOL.items():
    assert r.params[k] == pytest.approx(PUBLISHED[k], rel=tol), (k, r.params[k])
  # Compute-optimal exponent a = beta / (alpha + beta): 0.3672 / 0.7145 = 0.5139.
  a = r.params["beta"] / (r.params["alpha"] + r.params["beta"])
  assert a == pytest.approx(0.5139, abs=5e-4)


def test_bootstrap_intervals_cover_the_truth():
  """Synthetic Chinchilla data: the 95% percentile intervals of 60 resamples contain the true
  exponents and the point estimates, and shrink when the noise does."""
  law = get_law("chinchilla")
  truth = dict(PUBLISHED)
  mesh = np.meshgrid(np.geomspace(5e7, 2e10, 6), np.geomspace(1e9, 1e12, 6), indexing="ij")
  n, d = mesh[0].ravel(), mesh[1].ravel()
  widths = []
  for noise in (1e-2, 1e-3):
    loss = law.loss(truth, N=n, D=d) * np.exp(noise * np.random.default_rng(1).standard_normal(n.size))
    r = fit(law, {"N": n, "D": d, "loss": loss}, loss="squares", starts=law.to_raw(truth)[None],
            bootstrap=60, seed=0)
    for k in ("alpha", "beta", "E"):
      lo, hi = r.intervals[k]
      assert lo <= r.params[k] <= hi and lo <= truth[k] <= hi, (k, noise, lo, hi)
    widths.append(r.intervals["alpha"][1] - r.intervals["alpha"][0])
  assert widths[1] < 0.3 * widths[0]


def test_fit_arguments_are_checked():
  law = get_law("chinchilla")
  data = {"N": np.array([1e8, 1e9]), "D": np.array([1e9, 1e10]), "loss": np.array([3.0, 2.5])}
  with pytest.raises(ValueError, match=r"loss = 'l1'.*huber"):
    fit(law, data, loss="l1")
  with pytest.raises(ValueError, match=r"delta = -1.*> 0"):
    fit(law, data, delta=-1)
  with pytest.raises(ValueError, match=r"lack \['D'\]"):
    fit(law, {"N": data["N"], "loss": data["loss"]})
  with pytest.raises(ValueError, match=r"column 'loss' holds \[-1.0\]"):
    fit(law, {**data, "loss": np.array([3.0, -1.0])})


def test_padding_leaves_the_objective_unchanged():
  """The fitter pads points to a bucket size with copies of point 0 at weight 0 (one compiled
  program per bucket): the objective and its gradient are those of the unpadded points, for
  both losses."""
  import jax
  from moejax.scaling import fitting

  assert [fitting._padded_size(k, 64) for k in (1, 64, 65, 240, 1024, 1025, 4500)] == [
      64, 64, 128, 256, 1024, 2048, 5120]
  law = get_law("chinchilla")
  d = chinchilla_epoch()
  n = 37
  cols = {k: np.log(d[k][:n]) for k in ("N", "D", "loss")}
  padded = {k: fitting._pad_rows(v, 64) for k, v in cols.items()}
  w = np.zeros(64)
  w[:n] = np.arange(1, n + 1)   # bootstrap-like integer weights
  raw = law.to_raw(PUBLISHED) + 0.01
  value_and_grad = jax.jit(jax.value_and_grad(fitting._objective), static_argnums=4)
  with jax.enable_x64(True):
    for huber in (True, False):
      value, grad = value_and_grad(raw, w[:n], {k: cols[k] for k in ("N", "D")}, cols["loss"], law,
                                   huber, 1e-3)
      value_p, grad_p = value_and_grad(raw, w, {k: padded[k] for k in ("N", "D")}, padded["loss"],
                                       law, huber, 1e-3)
      assert float(value_p) == pytest.approx(float(value), rel=1e-13, abs=0)
      np.testing.assert_allclose(grad_p, grad, rtol=1e-12)
