"""Tokenizers for real text, looked up by `config.data.tokenizer` in `TOKENIZERS`.

A tokenizer turns one document's bytes into token ids and back:
  encode(text: bytes | str) -> ids [N] int32;  decode(ids [N]) -> bytes;
  vocab_size: int (every id is < vocab_size);  eos_id: int | None, appended to each document by
  the Grain pipeline when not None, so a model learns where documents end.

`byte`: raw UTF-8 bytes, vocabulary 256, no special ids and no files (the same tokens as
`data.source='text'`; ByT5, Xue et al. 2022, arXiv:2105.13626, minus its special ids).
`sentencepiece`: a SentencePiece model file (Kudo & Richardson 2018, "SentencePiece: A simple
and language independent subword tokenizer and detokenizer for Neural Text Processing",
arXiv:1808.06226), e.g. one trained with `python -m moejax.data.train_tokenizer`.
"""
from __future__ import annotations


import numpy as np

from moejax.data import base
from moejax.data.text import BYTE_VOCAB
from moejax.registry import Registry


class ByteTokenizer:
  """Bytes as tokens: id = byte value, vocabulary 256, no EOS (no files needed).

  Lossless for any byte string: decode(encode(x)) == x (str input is UTF-8 encoded first).
  """

  name = "byte"
  vocab_size = BYTE_VOCAB
  eos_id = None

  def encode(self, text: bytes | str) -> np.ndarray:
    """text -> ids [N] int32, one per byte."""
    if isinstance(text, str):
      text = text.encode("utf-8")
    return np.frombuffer(bytes(text), np.uint8).astype(np.int32)

  def decode(self, ids) -> bytes:
    """ids [N] (each in [0, 256)) -> the bytes they stand for."""
    return np.asarray(ids, np.int64).astype(np.uint8).tobytes()

  @classmethod
  def from_config(cls, config) -> "ByteTokenizer":
    """The byte tokenizer ignores config.data.tokenizer_model."""
    del config
    return cls()


class SentencePieceTokenizer:
  """A SentencePiece model loaded from a local file (Kudo & Richardson 2018, arXiv:1808.06226).

  `vocab_size` is the model's piece count; `eos_id` its EOS id (None if the model has none).
  Text is decoded from UTF-8 (invalid bytes replaced) before encoding, and decode returns UTF-8.
  """

  name = "sentencepiece"

  def __init__(self, model_file: str):
    import sentencepiece as spm   # the `data` extra; imported here so moejax needs it only now
    self.model_file = model_file
    self._sp = spm.SentencePieceProcessor(model_file=model_file)
    self.vocab_size = int(self._sp.get_piece_size())
    eos = int(self._sp.eos_id())
    self.eos_id = eos if eos >= 0 else None

  def encode(self, text: bytes | str) -> np.ndarray:
    """text -> ids [N] int32 (no EOS: the pipeline appends it)."""
    if isinstance(text, (bytes, bytearray, memoryview)):
      text = bytes(text).decode("utf-8", errors="replace")
    return np.asarray(self._sp.encode(text, out_type=int), np.int32)

  def decode(self, ids) -> bytes:
    """ids [N] -> UTF-8 bytes of the detokenized text (control ids such as EOS are dropped)."""
    return self._sp.decode([int(i) for i in np.asarray(ids).ravel()]).encode("utf-8")

  def __getstate__(self):
    # Grain's worker processes receive the pipeline pickled: send the path, reload there.
    return {"model_file": self.model_file}

  def __setstate__(self, state):
    self.__init__(state["model_file"])

  @classmethod
  def from_config(cls, config) -> "SentencePieceTokenizer":
    """Loads config.data.tokenizer_model (a SentencePiece `.model` file)."""
    path = base.existing_path(
        config.data.get("tokenizer_model", ""), "data.tokenizer_model", "file",
        "the path of a SentencePiece model file",
        "required for data.tokenizer='sentencepiece'; train one with "
        "python -m moejax.data.train_tokenizer")
    try:
      return cls(path)
    except (OSError, RuntimeError) as e:
      raise ValueError(f"data.tokenizer_model: got {path!r}, which SentencePiece cannot load "
                       f"({e}); allowed: a SentencePiece model file") from None


# name (a value of config.data.tokenizer) -> factory(config).
TOKENIZERS = Registry("data.tokenizer", {
    "byte": ByteTokenizer.from_config,
    "sentencepiece": SentencePieceTokenizer.from_config,
})


def make_tokenizer(config):
  """The tokenizer `config.data.tokenizer` names, checked against the model's embedding.

  Raises ValueError naming data.tokenizer for an unknown name, and model.vocab_size when the
  tokenizer's vocabulary does not fit in the model's embedding table.
  """
  name = config.data.get("tokenizer", "byte")
  tokenizer = TOKENIZERS[name](config)   # an unknown name: ConfigError naming data.tokenizer
  vocab = config.model.vocab_size
  if isinstance(vocab, bool) or not isinstance(vocab, (int, np.integer)) or (
      vocab < tokenizer.vocab_size):
    raise ValueError(f"model.vocab_size: got {vocab!r}; allowed: >= {tokenizer.vocab_size}, the "
                     f"vocabulary of data.tokenizer={name!r}"
                     + (f" ({tokenizer.model_file})" if hasattr(tokenizer, "model_file") else ""))
  return tokenizer
