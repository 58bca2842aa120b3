"""Bad data fails with a ValueError naming the config field, the file and, for a corrupt
ArrayRecord record, the record: at start-up (a truncated ArrayRecord file, a file that is not
ArrayRecord, a truncated SentencePiece model, a text glob of empty files) or at the first read
of the bad record, never as a bare error from inside Grain or the readers."""
import os

import numpy as np
import pytest
from array_record.python import array_record_module

from moejax import data
from moejax.data import train_tokenizer
from moejax.train import train_and_evaluate

from helpers import load_config

# Short documents: one packed row each, so a few batches read every record.
DOCS = [f"doc {i}: " + "ab " * (i % 5 + 1) for i in range(40)]


def _write(path, docs):
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for d in docs:
    writer.write(d.encode("utf-8"))
  writer.close()


def _corpus(folder):
  os.makedirs(folder, exist_ok=True)
  _write(folder / "part-0.array_record", DOCS[:20])
  _write(folder / "part-1.array_record", DOCS[20:])
  return folder / "part-1.array_record"


def _config(folder, **overrides):
  return load_config(**{"data.source": f"array_record:{folder}/*.array_record",
                        "model.vocab_size": 256, "model.max_len": 32, "train.seq_len": 32,
                        "train.batch_size": 4, "data.packing_bins": 2, **overrides})


def _raises(fn, *fragments):
  with pytest.raises(ValueError) as e:
    fn()
  for f in fragments:
    assert f in str(e.value), (f, str(e.value))
  return str(e.value)


def test_truncated_or_foreign_array_record_file_fails_at_start_up(tmp_path):
  bad = _corpus(tmp_path)
  raw = bad.read_bytes()
  config = _config(tmp_path)
  data.make_source(config, "train")   # the intact corpus builds
  bad.write_bytes(raw[:len(raw) // 2])   # a copy cut short
  _raises(lambda: data.make_source(config, "train"), "data.source", str(bad),
          f"({len(raw) // 2} bytes)", "truncated")
  bad.write_bytes(b"plain text, not ArrayRecord\n" * 10)
  _raises(lambda: data.make_source(config, "eval"), "data.source", str(bad), "not a readable")
  # The same through data.eval_glob, which names its own field.
  _write(bad, DOCS[20:])
  (tmp_path / "eval").mkdir()
  (tmp_path / "eval" / "e.array_record").write_bytes(b"")
  _raises(lambda: data.make_source(_config(tmp_path, **{
      "data.eval_glob": str(tmp_path / "eval" / "*.array_record")}), "eval"),
          "data.eval_glob", "e.array_record", "(0 bytes)")


def test_corrupt_record_fails_at_its_first_read_naming_file_and_record(tmp_path):
  bad = _corpus(tmp_path)
  raw = bytearray(bad.read_bytes())
  # Overwrite the text of the 6th record of part-1 (doc 25) in place: its chunk's hash fails.
  at = bytes(raw).index(DOCS[25].encode("utf-8"))
  raw[at:at + 8] = b"XXXXXXXX"
  bad.write_bytes(bytes(raw))
  source = data.make_source(_config(tmp_path), "train")   # the footer is fine: builds
  msg = _raises(lambda: [source.next() for _ in range(40)], "data.source", str(bad),
                "cannot be read, the file is corrupt", "Corrupted Riegeli")
  record = int(msg.split("; record ")[1].split(" ")[0])
  assert record in (5, 6), msg   # the damaged chunk, or the next one whose header it reaches
  assert f"(record {20 + record} of 40 in all)" in msg, msg


def test_unreadable_sentencepiece_model_fails_at_start_up(tmp_path):
  text = tmp_path / "t.txt"
  rng = np.random.default_rng(0)
  text.write_text("\n".join(" ".join(rng.choice(["ab", "cd", "ef", "gh"], 6))
                            for _ in range(300)))
  train_tokenizer.train(str(text), 16, str(tmp_path / "sp"))
  model = tmp_path / "sp.model"
  _corpus(tmp_path / "corpus")
  config = _config(tmp_path / "corpus", **{"data.tokenizer": "sentencepiece",
                                           "data.tokenizer_model": str(model)})
  data.make_source(config, "train")   # the intact model loads
  model.write_bytes(model.read_bytes()[:100])
  _raises(lambda: data.make_source(config, "train"), "data.tokenizer_model", str(model),
          "cannot load")


def test_text_glob_of_empty_files_fails_before_anything_compiles(tmp_path):
  for i in range(2):
    (tmp_path / f"empty{i}.txt").write_bytes(b"")
  config = load_config(**{"data.source": "text", "data.text_glob": str(tmp_path / "*.txt"),
                          "model.vocab_size": 256})
  _raises(lambda: train_and_evaluate(config, str(tmp_path / "run")), "data.text_glob",
          "empty0.txt", "no document")
  assert not os.path.exists(tmp_path / "run" / "checkpoints")   # failed before the trainer
  config.data.text_glob = str(tmp_path / "*.md")
  _raises(lambda: train_and_evaluate(config, str(tmp_path / "run")), "data.text_glob",
          "*.md", "matches no file")
