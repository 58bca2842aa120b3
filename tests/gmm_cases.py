"""Group-size cases and the closeness check the grouped-matmul tests share (M = 13 rows in 5
groups: every edge of the kernel contract)."""
import numpy as np
from hypothesis import strategies as st

# (name, group_sizes [5]) over M = 13 rows.
GROUP_SIZE_CASES = [
    ("empty_groups", [4, 0, 6, 0, 3]),
    ("one_group_takes_all", [0, 0, 13, 0, 0]),
    ("sum_below_m", [2, 0, 5, 1, 0]),
    ("all_empty", [0, 0, 0, 0, 0]),
    ("one_row_each", [1, 1, 1, 1, 1]),
    ("sum_above_m_is_cut", [5, 6, 7, 0, 2]),
]


def close(got, want, rtol=1e-5, atol=1e-6):
  """allclose in float64 with `atol` relative to the largest |want|."""
  want = np.asarray(want, np.float64)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol,
                             atol=atol * max(1.0, np.abs(want).max()))


@st.composite
def random_group_sizes(draw, m, g):
  """g non-negative group sizes with sum <= m, skewed: cut points of a random total."""
  total = draw(st.integers(0, m))
  cuts = sorted(draw(st.lists(st.integers(0, total), min_size=g - 1, max_size=g - 1)))
  return np.diff([0, *cuts, total]).astype(np.int32)
