"""Tests for moejax.metrics: the jsonl records, TensorBoard events read back with a small
independent TFRecord reader (its own CRC-32C), resume truncation, kill-safety, the progress bar
and the summary."""

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from moejax.metrics import MetricWriter, ProgressBar, format_summary, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_events(tb_dir):
  """All events of all event files in `tb_dir`, file by file in name order (TFRecord framing:
  u64 length, u32 masked crc of the length, payload, u32 masked crc of the payload)."""
  events = []
  for name in sorted(os.listdir(tb_dir)):
    assert "tfevents" in name, name
    data = open(os.path.join(tb_dir, name), "rb").read()
    pos = 0
    while pos < len(data):
      header = data[pos : pos + 8]
      (length,) = struct.unpack("<Q", header)
      (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
      payload = data[pos + 12 : pos + 12 + length]
      (payload_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
      assert header_crc == _masked(_crc32c(header))
      assert payload_crc == _masked(_crc32c(payload))
      events.append((name, event_pb2.Event.FromString(payload)))
      pos += 16 + length
  return events


def _scalars(events):
  return [
      (e.step, v.tag, v.simple_value)
      for _, e in events
      if e.HasField("summary")
      for v in e.summary.value
  ]


def test_crc32c_reference():
  assert _crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value


def test_jsonl_and_tensorboard_hold_what_was_written(tmp_path):
  with MetricWriter(tmp_path) as w:
    w.write(
        1,
        {
            "train/loss": 4.5,
            "train/lr": np.float32(1e-4),
            "moe/layer_0/load": jnp.array([0.25, 0.5, 0.125, 0.125]),
        },
    )
    w.write(
        np.int64(2),
        {
            "eval/loss": jnp.float32(3.25),
            "train/tokens_per_s": 1234,
            "grid": np.array([[1, 2], [3, 4]]),
        },
    )
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(ln) for ln in lines] == [
      {
          "step": 1,
          "train/loss": 4.5,
          "train/lr": float(np.float32(1e-4)),
          "moe/layer_0/load": [0.25, 0.5, 0.125, 0.125],
      },
      {
          "step": 2,
          "eval/loss": 3.25,
          "train/tokens_per_s": 1234.0,
          "grid": [[1.0, 2.0], [3.0, 4.0]],
      },
  ]
  assert isinstance(json.loads(lines[0])["step"], int)
  assert (
      read_metrics(tmp_path)
      == read_metrics(tmp_path / "metrics.jsonl")
      == [json.loads(ln) for ln in lines]
  )

  events = _read_events(tmp_path / "tb")
  assert events[0][1].file_version == "brain.Event:2"
  assert _scalars(events) == [
      (1, "train/loss", 4.5),
      (1, "train/lr", float(np.float32(1e-4))),
      (1, "moe/layer_0/load/0", 0.25),
      (1, "moe/layer_0/load/1", 0.5),
      (1, "moe/layer_0/load/2", 0.125),
      (1, "moe/layer_0/load/3", 0.125),
      (2, "eval/loss", 3.25),
      (2, "train/tokens_per_s", 1234.0),
      (2, "grid/0", 1.0),
      (2, "grid/1", 2.0),
      (2, "grid/2", 3.0),
      (2, "grid/3", 4.0),
  ]


def test_resume_drops_later_steps_and_cut_line(tmp_path):
  with MetricWriter(tmp_path) as w:
    for step in range(1, 11):
      w.write(step, {"train/loss": 10.0 - step})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 11, "train/lo')  # killed mid-line
  assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 11))

  with MetricWriter(tmp_path, resume_step=6) as w:
    for step in (7, 8):
      w.write(step, {"train/loss": 100.0 + step})
  records = read_metrics(tmp_path)
  assert [r["step"] for r in records] == list(range(1, 9))
  assert [r["train/loss"] for r in records] == [9.0, 8, 7, 6, 5, 4, 107, 108]

  # TensorBoard: a second file that starts with a SessionLog.START at step 7, which makes
  # TensorBoard hide the first file's steps >= 7.
  events = _read_events(tmp_path / "tb")
  files = sorted({name for name, _ in events})
  assert len(files) == 2
  second = [e for name, e in events if name == files[1]]
  assert second[1].step == 7
  assert second[1].session_log.status == event_pb2.SessionLog.START
  assert [(s, v) for s, _, v in _scalars([(files[1], e) for e in second])] == [
      (7, 107.0),
      (8, 108.0),
  ]


def test_fresh_writer_appends_but_drops_cut_line(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a"')
  with MetricWriter(tmp_path, tensorboard=False) as w:
    w.write(2, {"a": 2.0})
  assert read_metrics(tmp_path) == [{"step": 1, "a": 1.0}, {"step": 2, "a": 2.0}]
  assert not (tmp_path / "tb").exists()


def test_killed_writer_keeps_every_written_line(tmp_path):
  script = tmp_path / "child.py"
  script.write_text(textwrap.dedent(f"""
        import time
        from moejax.metrics import MetricWriter
        w = MetricWriter({str(tmp_path)!r})
        for step in range(1, 4):
            w.write(step, {{"train/loss": float(step)}})
        print("WROTE", flush=True)
        time.sleep(60)
    """))
  proc = subprocess.Popen(
      [sys.executable, str(script)],
      stdout=subprocess.PIPE,
      text=True,
      env=dict(os.environ, PYTHONPATH=REPO),
  )
  assert proc.stdout.readline().strip() == "WROTE"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert [r["train/loss"] for r in read_metrics(tmp_path)] == [1.0, 2.0, 3.0]
  assert [(s, v) for s, _, v in _scalars(_read_events(tmp_path / "tb"))] == [
      (1, 1.0),
      (2, 2.0),
      (3, 3.0),
  ]


def test_write_rejects_bad_names_and_values(tmp_path):
  with MetricWriter(tmp_path, tensorboard=False) as w:
    with pytest.raises(TypeError, match=r"scalars\['train/name'\]='abc': allowed are numbers"):
      w.write(1, {"train/name": "abc"})
    with pytest.raises(TypeError, match=r"key='step': allowed"):
      w.write(1, {"step": 3})
  assert read_metrics(tmp_path) == []


def test_progress_bar_shows_step_and_postfix(capsys):
  bar = ProgressBar(100, initial=40, disable=False)
  bar.update(50, loss=2.5, tokens_per_s=1234.4, max_vio=0.125)
  bar.close()
  err = capsys.readouterr().err
  assert "50/100" in err
  assert "loss=2.5000" in err and "tok/s=1,234" in err and "max_vio=0.125" in err


def test_format_summary():
  text = format_summary(
      {
          "train/loss": 2.0,
          "eval/loss": 2.25,
          "data/loss_floor": 2.0,
          "train/tokens_per_s": 1500.0,
          "train/steps": 300,
          "moe/load": np.array([0.5, 0.25, 0.25]),
          "metrics": "/w/metrics.jsonl",
      }
  )
  lines = text.splitlines()
  assert lines == [
      "train/loss          2.0000",
      "eval/loss           2.2500",
      "data/loss_floor     2.0000",
      "train/tokens_per_s  1,500.0",
      "train/steps         300",
      "moe/load            [0.500 0.250 0.250]",
      "metrics             /w/metrics.jsonl",
      "eval/loss - floor   0.2500",
  ]


def test_non_primary_writer_checks_but_writes_nothing(tmp_path):
  """On processes other than 0 of a multi-host run the writer touches no file, yet still rejects
  bad values, so a bug shows on every host."""
  w = MetricWriter(tmp_path / "run", primary=False)
  w.write(1, {"train/loss": 1.0, "moe/layer_0/load": [0.5, 0.5]})
  with pytest.raises(TypeError, match="train/loss"):
    w.write(2, {"train/loss": "high"})
  w.close()
  assert not (tmp_path / "run").exists()
