"""Tokenizers (moejax.data.tokenizers) and the offline SentencePiece trainer.

References: the bytes themselves (byte tokenizer); the model's own pieces joined by hand
(SentencePiece: '▁' marks a word start); the text the test wrote.
"""
import subprocess
import sys

import numpy as np
import pytest

from moejax.data import tokenizers, train_tokenizer

from helpers import ROOT, load_config

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega").split()


def test_byte_tokenizer_round_trips_any_bytes():
  tok = tokenizers.make_tokenizer(load_config(**{"model.vocab_size": 256}))
  assert tok.vocab_size == 256 and tok.eos_id is None
  raw = bytes(np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8))   # not UTF-8
  ids = tok.encode(raw)
  assert ids.dtype == np.int32 and ids.tolist() == list(raw)
  assert tok.decode(ids) == raw
  assert tok.encode("héllo").tolist() == list("héllo".encode("utf-8"))


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
  """A 32-piece SentencePiece model trained offline on text written here."""
  folder = tmp_path_factory.mktemp("spm")
  rng = np.random.default_rng(0)
  for i in range(4):
    lines = [" ".join(rng.choice(WORDS, rng.integers(3, 12))) for _ in range(200)]
    (folder / f"part{i}.txt").write_text("\n".join(lines) + "\n")
  # Through the command line, as a user runs it.
  out = subprocess.run(
      [sys.executable, "-m", "moejax.data.train_tokenizer", "--input", str(folder / "*.txt"),
       "--vocab_size", "32", "--model_prefix", str(folder / "sp32")],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert (folder / "sp32.model").is_file()
  return str(folder / "sp32.model")


def test_sentencepiece_round_trip_and_pieces(sp_model):
  config = load_config(**{"model.vocab_size": 64, "data.tokenizer": "sentencepiece",
                          "data.tokenizer_model": sp_model})
  tok = tokenizers.make_tokenizer(config)
  assert tok.vocab_size == 32 and tok.eos_id == 2
  text = "gamma delta omega alpha psi"
  ids = tok.encode(text.encode("utf-8"))
  assert ids.dtype == np.int32 and len(ids) > 0 and ids.max() < 32
  assert tok.decode(ids) == text.encode("utf-8")
  # Independent of decode: the pieces, joined, spell the text ('▁' = a word's leading space).
  pieces = "".join(tok._sp.id_to_piece(int(i)) for i in ids)
  assert pieces.replace("\u2581", " ").strip() == text
  assert 2 not in ids.tolist()                     # EOS is the pipeline's job, not encode's
  # A smaller vocabulary than words: some words take several pieces (it is a subword model).
  assert len(ids) > len(text.split())


def test_tokenizer_errors_name_the_field(sp_model, tmp_path):
  def raises(overrides, *fragments):
    with pytest.raises(ValueError) as err:
      tokenizers.make_tokenizer(load_config(**overrides))
    for f in fragments:
      assert f in str(err.value), (f, str(err.value))

  raises({"data.tokenizer": "wordpiece"}, "data.tokenizer", "'wordpiece'", "byte",
         "sentencepiece")
  raises({"model.vocab_size": 128}, "model.vocab_size", "128", ">= 256", "byte")
  raises({"model.vocab_size": 16, "data.tokenizer": "sentencepiece",
          "data.tokenizer_model": sp_model}, "model.vocab_size", "16", ">= 32", "sp32.model")
  raises({"data.tokenizer": "sentencepiece"}, "data.tokenizer_model", "''")
  raises({"data.tokenizer": "sentencepiece", "data.tokenizer_model": str(tmp_path / "no.model")},
         "data.tokenizer_model", "no.model", "not a file")
  (tmp_path / "junk.model").write_bytes(b"not a model")
  raises({"data.tokenizer": "sentencepiece", "data.tokenizer_model": str(tmp_path / "junk.model")},
         "data.tokenizer_model", "junk.model", "cannot load")
  with pytest.raises(ValueError, match=r"--input: got .*matches no file"):
    train_tokenizer.train(str(tmp_path / "*.none"), 32, str(tmp_path / "m"))
