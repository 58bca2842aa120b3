"""Executes every notebook in notebooks/*.ipynb with nbclient and fails on any cell error.

A notebook added to notebooks/ is picked up automatically (the tests are parametrised over the
glob). Notebooks listed in `CHECKS` also get a probe cell appended (run in the same kernel after
the last cell) that prints values the notebook computed, and the test asserts on them.

The kernel must be this interpreter (the venv that has moejax's dependencies): a kernelspec for
`sys.executable` is written into a temporary directory and put first on JUPYTER_PATH.
"""

import glob
import json
import math
import os
import sys
import time

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(REPO, "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
CELL_TIMEOUT_S = 300
PROBE_MARK = "__moejax_notebook_probe__ "

# notebook file name -> (probe source printing one JSON dict, check(values: dict) -> None)
CHECKS = {
    "moe_layer_tour.ipynb": (
        "import json\n"
        f"print({PROBE_MARK!r} + json.dumps({{'max_abs_diff': float(max_abs_diff)}}))",
        lambda v: _assert_below(v["max_abs_diff"], 1e-5, "capacity (large factor) vs dropless"),
    ),
    # The notebook's Chinchilla fit against Besiroglu et al. 2024 (arXiv:2404.10102), and its
    # Clark et al. S-Base fit against Table 3 of arXiv:2202.01169 (as transcribed second-hand;
    # see experiments/scaling/README.md).
    "scaling_laws.ipynb": (
        "import json\n"
        f"print({PROBE_MARK!r} + json.dumps({{**result.params, 'clark_a': clark_fit.params['a']}}))",
        lambda v: _check_scaling_fit(v),
    ),
    # The tiny router comparison: I(expert; domain) is a mutual information over 4 domains, in
    # [0, ln 4]; every arm learned something (below ln V = ln 32, the uniform guess).
    "router_zoo.ipynb": (
        "import json\n"
        f"print({PROBE_MARK!r} + json.dumps({{'mi': mi, 'loss': eval_loss}}))",
        lambda v: _check_router_zoo(v),
    ),
}


def _check_router_zoo(v: dict) -> None:
  assert len(v["mi"]) == 2 and set(v["mi"]) == set(v["loss"])
  for arm, mi in v["mi"].items():
    assert -1e-9 <= mi <= math.log(4) + 1e-9, (arm, mi)
    assert v["loss"][arm] < math.log(32) - 0.1, (arm, v["loss"][arm])


def _check_scaling_fit(v: dict) -> None:
  assert v["alpha"] == pytest.approx(0.3473, rel=1e-3)
  assert v["beta"] == pytest.approx(0.3672, rel=1e-3)
  assert v["E"] == pytest.approx(1.8172, rel=1e-3)
  assert v["clark_a"] == pytest.approx(-0.082, rel=0.1)


def _assert_below(value: float, bound: float, what: str) -> None:
  assert value < bound, f"{what}: max |difference| = {value:.3e}, expected < {bound:g}"


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
  """A kernelspec for this interpreter, written into a temporary JUPYTER_PATH (the machine's
  `python3` kernelspec may start another interpreter, without moejax's dependencies)."""
  name = "moejax-test-python"
  root = tmp_path_factory.mktemp("jupyter")
  kernel_dir = root / "kernels" / name
  kernel_dir.mkdir(parents=True)
  (kernel_dir / "kernel.json").write_text(
      json.dumps(
          {
              "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
              "display_name": f"moejax tests ({sys.executable})",
              "language": "python",
          }
      )
  )
  old = os.environ.get("JUPYTER_PATH")
  os.environ["JUPYTER_PATH"] = os.pathsep.join([str(root)] + ([old] if old else []))
  try:
    yield name
  finally:
    if old is None:
      os.environ.pop("JUPYTER_PATH", None)
    else:
      os.environ["JUPYTER_PATH"] = old


def _probe_values(cell) -> dict:
  """The JSON dict a probe cell printed (the line starting with PROBE_MARK)."""
  text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
  for line in text.splitlines():
    if line.startswith(PROBE_MARK):
      return json.loads(line[len(PROBE_MARK) :])
  raise AssertionError(f"the probe cell printed no {PROBE_MARK.strip()} line: {text!r}")


def test_notebooks_are_found():
  """The glob sees the notebooks (so an empty parametrisation cannot pass silently)."""
  names = [os.path.basename(p) for p in NOTEBOOKS]
  assert "moe_layer_tour.ipynb" in names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_executes(path, kernel_name):
  """Runs every cell (cwd = notebooks/, like Jupyter); any cell error fails the test."""
  nb = nbformat.read(path, as_version=4)
  check = CHECKS.get(os.path.basename(path))
  if check is not None:
    nb.cells.append(nbformat.v4.new_code_cell(check[0]))
  client = NotebookClient(
      nb,
      kernel_name=kernel_name,
      timeout=CELL_TIMEOUT_S,
      allow_errors=False,
      resources={"metadata": {"path": os.path.dirname(path)}},
  )
  start = time.perf_counter()
  client.execute()  # raises CellExecutionError naming the cell and the traceback
  print(f"{os.path.basename(path)} executed in {time.perf_counter() - start:.1f} s")
  if check is not None:
    check[1](_probe_values(nb.cells[-1]))
