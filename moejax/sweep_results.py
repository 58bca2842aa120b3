"""The results CSV of a sweep: one row per finished run, appended as runs finish, so a killed
sweep restarts where it stopped (experiments/scaling/sweep.py, experiments/routers/compare.py)."""
from __future__ import annotations

import csv
import os
from typing import Sequence


def finished_names(results_path: str) -> set[str]:
  """The `name` column of the runs already in the results file (none if it does not exist)."""
  if not os.path.exists(results_path):
    return set()
  with open(results_path, newline="") as f:
    return {row["name"] for row in csv.DictReader(f)}


def append_row(results_path: str, row: dict, columns: Sequence[str]) -> None:
  """Appends `row`'s `columns` (floats as repr, exact) to the CSV, with the header first for a
  new file; flushed and fsynced: a row is on disk once it is there, and a killed sweep never
  leaves half a row."""
  new = not os.path.exists(results_path) or os.path.getsize(results_path) == 0
  with open(results_path, "a", newline="") as f:
    writer = csv.writer(f, lineterminator="\n")
    if new:
      writer.writerow(columns)
    writer.writerow([repr(row[k]) if isinstance(row[k], float) else row[k] for k in columns])
    f.flush()
    os.fsync(f.fileno())
