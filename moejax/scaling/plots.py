"""Plots of scaling-law fits (matplotlib, Agg backend: works headless)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moejax.scaling.fitting import FitResult  # noqa: E402


def plot_fit(result: FitResult, data: dict, path: str | None = None):
  """Data and fit against the law's first variable (colour: its second), and log-residuals, for a
  law fitted by `moejax.scaling.fit` (Hoffmann et al. 2022, arXiv:2203.15556, Appendix D.2
  procedure). Saves to `path` when given; returns the figure."""
  law = result.law
  x_name = law.variables[0]
  x = np.asarray(data[x_name], np.float64)
  color = np.log10(np.asarray(data[law.variables[1]], np.float64)) if len(law.variables) > 1 else None
  pred = law.loss(result.params, **{v: np.asarray(data[v], np.float64) for v in law.variables})
  loss = np.asarray(data["loss"], np.float64)
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.2))
  sc = ax0.scatter(x, loss, c=color, s=14, cmap="viridis", label="data")
  ax0.scatter(x, pred, marker="x", s=14, c="k", linewidths=0.7, label="fit")
  ax0.set(xscale="log", xlabel=x_name, ylabel="loss", title=f"{law.name}: {law.formula}")
  ax0.legend()
  if color is not None:
    fig.colorbar(sc, ax=ax0, label=f"log10 {law.variables[1]}")
  ax1.scatter(x, np.log(loss) - np.log(pred), s=12, c=color, cmap="viridis")
  ax1.axhline(0.0, color="k", lw=0.8)
  ax1.set(xscale="log", xlabel=x_name, ylabel="log L - log L_hat",
          title=f"residuals (RMSE {result.rmse_log:.4f} in ln)")
  fig.tight_layout()
  if path:
    fig.savefig(path, dpi=120)
  return fig
