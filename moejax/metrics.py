"""Metrics: JSON lines + TensorBoard, a progress bar, and the end-of-run summary.

`WORKDIR/metrics.jsonl` holds one JSON object per `MetricWriter.write`: `{"step": 100,
"train/loss": 3.2, "moe/layer_0/load": [0.13, 0.12, ...], ...}` (names as in
docs/ARCHITECTURE.md). It is the file analysis code reads (`read_metrics`); TensorBoard events
in `WORKDIR/tb` carry the same scalars for watching a run.

Not a paper implementation: infrastructure for the training loop (issue 2, section 6).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
import time
from typing import Any

import numpy as np


def _import_tensorboardx():
  """tensorboardX's package import loads torch when it is installed (about 1 s per process;
  the `hf` test extra installs it), only to accept torch tensors, which moejax never writes.
  While tensorboardX is imported, `import torch` fails (a None entry in sys.modules), unless
  torch is loaded already; the entry is removed afterwards, so torch imports normally later."""
  block = "torch" not in sys.modules
  if block:
    sys.modules["torch"] = None
  try:
    from tensorboardX.event_file_writer import EventsWriter  # noqa: PLC0415
    from tensorboardX.proto import event_pb2, summary_pb2  # noqa: PLC0415
  finally:
    if block:
      del sys.modules["torch"]
  return EventsWriter, event_pb2, summary_pb2


EventsWriter, event_pb2, summary_pb2 = _import_tensorboardx()

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def _to_json_value(name: str, value: Any) -> float | list:
  """A float for scalars (Python, numpy, jax), a nested list of floats for arrays."""
  if isinstance(value, (str, bytes)) or value is None:
    raise TypeError(
        f"MetricWriter.write scalars[{name!r}]={value!r}: allowed are numbers and "
        "numeric arrays (jax, numpy, Python)"
    )
  try:
    arr = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise TypeError(
        f"MetricWriter.write scalars[{name!r}]={value!r}: allowed are numbers and "
        f"numeric arrays (jax, numpy, Python): {e}"
    ) from e
  return float(arr) if arr.ndim == 0 else arr.tolist()


def _read_lines(path: str) -> tuple[list[str], bool]:
  """The newline-terminated lines of `path`, and whether a last line was cut (by a kill)."""
  if not os.path.exists(path):
    return [], False
  with open(path, encoding="utf-8") as f:
    *lines, tail = f.read().split("\n")
  return [ln + "\n" for ln in lines], tail != ""


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """The records of a metrics.jsonl file (or of `path/metrics.jsonl` for a workdir), in order.

  A last line without its newline (the process was killed while writing it) is skipped.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"read_metrics path={path!r}: no such file")
  return [json.loads(line) for line in _read_lines(path)[0] if line.strip()]


def truncate_metrics(path: str | os.PathLike, step: float) -> int:
  """Drops the records of `path` with `step` > `step`, and a cut last line; returns how many.

  Used on resume from checkpoint `step`: the steps after it will be trained and logged again.
  The kept lines go to a temporary file renamed over the old one, so a kill during
  truncation leaves either the old or the new file.
  """
  path = os.fspath(path)
  lines, cut = _read_lines(path)
  kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= step]
  dropped = len(lines) - len(kept) + int(cut)
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  return dropped


class MetricWriter:
  """Writes scalars to `WORKDIR/metrics.jsonl` and TensorBoard events in `WORKDIR/tb`.

  Each `write(step, scalars)` appends one JSON line `{"step": step, **scalars}` with values
  as floats (jax/numpy/Python scalars) or nested lists of floats (arrays such as the
  per-expert load [E]); NaN and inf are written as JSON's usual `NaN`/`Infinity` extensions,
  which `json.loads` reads. Both outputs are flushed on every write, so a killed run keeps
  every line written before the kill.

  TensorBoard: a scalar is one scalar; an array is one scalar per element, named
  `name/i` with `i` the flat index (`moe/layer_0/load/3` is expert 3's load), so each
  expert's load is a curve over steps. Chosen over histograms, which lose which expert is
  which, and an expert's collapse is what one looks for.

  Resume: `MetricWriter(workdir, resume_step=n)` first drops the jsonl records with step > n
  (the resumed run logs those steps again) and starts a new event file with a `SessionLog.START`
  at step n + 1, which makes TensorBoard hide older events with step > n (what tensorboardX's
  `purge_step` does), so neither has duplicate steps. With `resume_step=None`
  the file is appended to as it is.

  Multi-host: every process makes one with `primary=(jax.process_index() == 0)`; the others
  check what they are given but write nothing, so the files have one writer.

  Args:
    workdir: the run's directory; created if missing.
    resume_step: the step of the restored checkpoint, or None for a fresh run.
    tensorboard: also write TensorBoard events.
    primary: False makes every method a no-op after checking its arguments.
  """

  def __init__(
      self, workdir: str | os.PathLike, *, resume_step: int | None = None, tensorboard: bool = True,
      primary: bool = True,
  ):
    self.workdir = os.fspath(workdir)
    self.path = os.path.join(self.workdir, METRICS_FILE)
    self.primary = primary
    self._file = self._tb = None
    if not primary:
      return
    os.makedirs(self.workdir, exist_ok=True)
    self.tb_dir = os.path.join(self.workdir, TB_DIR)
    # Without a resume step this still drops a last line cut by a kill, which the next
    # record would otherwise be glued onto.
    truncate_metrics(self.path, math.inf if resume_step is None else resume_step)
    self._file = open(self.path, "a", encoding="utf-8")
    self._tb = None
    if tensorboard:
      # tensorboardX's SummaryWriter queues events for a background thread and its
      # flush() does not drain that queue; its EventsWriter writes synchronously. Its
      # file name has the time in seconds and is opened "wb": the suffix keeps a resume
      # within the same second from overwriting the previous file.
      os.makedirs(self.tb_dir, exist_ok=True)
      self._tb = EventsWriter(
          os.path.join(self.tb_dir, "events"), filename_suffix=f".{os.getpid()}.{time.time_ns()}"
      )
      if resume_step is not None:
        # TensorBoard hides the events of earlier files with step >= this one.
        self._tb.write_event(
            event_pb2.Event(
                wall_time=time.time(),
                step=resume_step + 1,
                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
            )
        )
        self._tb.flush()

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    """Appends one record: `step` and every entry of `scalars` (name -> number or array).

    Raises:
      TypeError: a value is not numeric, or a name is not a str or is "step".
    """
    step = int(step)
    record: dict[str, Any] = {"step": step}
    for name, value in scalars.items():
      if not isinstance(name, str) or name == "step":
        raise TypeError(
            f"MetricWriter.write scalars key={name!r}: allowed are str names other "
            "than 'step' (the step is the first argument)"
        )
      record[name] = _to_json_value(name, value)
    if not self.primary:
      return
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      values = []
      for name, value in record.items():
        if name == "step":
          continue
        if isinstance(value, list):
          values += [
              summary_pb2.Summary.Value(tag=f"{name}/{i}", simple_value=v)
              for i, v in enumerate(np.ravel(value).tolist())
          ]
        else:
          values.append(summary_pb2.Summary.Value(tag=name, simple_value=value))
      self._tb.write_event(
          event_pb2.Event(
              wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=values)
          )
      )
      self._tb.flush()

  def close(self) -> None:
    """Flushes and closes both outputs."""
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class ProgressBar:
  """A tqdm bar over train steps showing loss, tokens/s and the MoE load imbalance.

  Args:
    total: the run's last step (`train.steps`).
    initial: the step resumed from (0 for a fresh run), so the bar and its rate start there.
    disable: passed to tqdm; None hides the bar when stderr is not a terminal.
  """

  def __init__(self, total: int, initial: int = 0, *, disable: bool | None = None):
    from tqdm.auto import tqdm

    self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=disable)
    self._step = initial

  def update(
      self,
      step: int,
      *,
      loss: float | None = None,
      tokens_per_s: float | None = None,
      max_vio: float | None = None,
  ) -> None:
    """Moves the bar to `step` and shows the given values (None ones are left out)."""
    postfix = {}
    if loss is not None:
      postfix["loss"] = f"{float(loss):.4f}"
    if tokens_per_s is not None:
      postfix["tok/s"] = f"{float(tokens_per_s):,.0f}"
    if max_vio is not None:
      postfix["max_vio"] = f"{float(max_vio):.3f}"
    if postfix:
      self._bar.set_postfix(postfix, refresh=False)
    self._bar.update(step - self._step)
    self._step = step

  def write(self, message: str) -> None:
    """Prints a line (an eval result) above the bar without breaking it."""
    self._bar.write(message)

  def close(self) -> None:
    """Closes the bar."""
    self._bar.close()


def _format_value(value: Any) -> str:
  if isinstance(value, bool) or not isinstance(
      value, (numbers.Number, np.ndarray, list, tuple, np.generic)
  ):
    return str(value)
  arr = np.asarray(value, dtype=np.float64)
  if arr.ndim == 0:
    v = float(arr)
    if isinstance(value, (int, np.integer)):
      return f"{int(value):,}"
    return f"{v:,.1f}" if abs(v) >= 1000 else f"{v:.4f}"
  return "[" + " ".join(f"{v:.3f}" for v in arr.ravel()) + "]"


def format_summary(summary: dict[str, Any]) -> str:
  """The end-of-run summary: one aligned `name  value` line per entry, in the given order.

  Numbers get 4 decimals (thousands separators from 1,000), arrays a list of 3-decimal
  values, anything else `str()`. When `data/loss_floor` is given with `eval/loss` or
  `train/loss`, a line `eval/loss - floor` (the gap left to learn, nats/token) is added. A run's
  summary (one naming its `checkpoints` and `metrics` file) ends with the command that plots it
  (`plots  python -m moejax.plot WORKDIR --out WORKDIR/plots`, moejax/plot.py).
  Example keys: `train/loss`, `eval/loss`, `data/loss_floor`, `train/tokens_per_s`,
  `moe/max_vio`, `moe/load`, `checkpoints`, `metrics`.
  """
  rows = [(str(k), _format_value(v)) for k, v in summary.items()]
  floor = summary.get("data/loss_floor")
  if floor is not None:
    for name in ("eval/loss", "train/loss"):
      if summary.get(name) is not None:
        rows.append((f"{name} - floor", f"{float(summary[name]) - float(floor):.4f}"))
        break
  if summary.get("metrics") and summary.get("checkpoints"):
    workdir = os.path.dirname(os.fspath(summary["metrics"])) or "."
    plots = os.path.join(workdir, "plots")
    rows.append(("plots", f"python -m moejax.plot {workdir} --out {plots}"))
  width = max((len(k) for k, _ in rows), default=0)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
