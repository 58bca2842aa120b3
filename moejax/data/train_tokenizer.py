"""Trains a SentencePiece model on local text files, offline.

  python -m moejax.data.train_tokenizer --input 'corpus/**/*.txt' --vocab_size 8000 \\
      --model_prefix tokenizers/corpus8k

writes `tokenizers/corpus8k.model` (and `.vocab`). Text files are read line by line; JSON-lines
files (`.jsonl`, `.jsonl.gz`, `.json.gz`, such as the allenai/c4 shards) by their "text" field.
Use the model with `--config.data.tokenizer=
sentencepiece --config.data.tokenizer_model=tokenizers/corpus8k.model` and a model.vocab_size of
at least the vocabulary size. SentencePiece (Kudo & Richardson 2018, arXiv:1808.06226) reads
the files line by line; the unigram language model (Kudo 2018, arXiv:1804.10959) is its default
model type, BPE (Sennrich et al. 2016, arXiv:1508.07909) the alternative.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
from typing import Iterator

from moejax.data import base

JSON_LINES = (".jsonl", ".jsonl.gz", ".json.gz")


def input_files(pattern: str) -> list[str]:
  """Sorted files matching the glob `pattern` (`**` recursive); ValueError naming --input if none
  match."""
  return base.match_files(pattern, "--input",
                          "a glob of local text files, e.g. 'corpus/**/*.txt'")


def sentences(paths: list[str]) -> Iterator[str]:
  """The non-empty lines of text files, and of the "text" field of JSON-lines files."""
  for path in paths:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
      for line in f:
        texts = [json.loads(line)["text"]] if path.endswith(JSON_LINES) and line.strip() else [line]
        for text in texts:
          for piece in text.splitlines():
            if piece.strip():
              yield piece


def train(pattern: str, vocab_size: int, model_prefix: str, *, model_type: str = "unigram",
          character_coverage: float = 1.0, byte_fallback: bool = False,
          max_sentences: int = 1_000_000, seed: int = 0) -> str:
  """Trains a SentencePiece model on the files matching `pattern`; returns the .model path.

  Ids: 0 <unk>, 1 <s> (BOS), 2 </s> (EOS; the Grain pipeline ends each document with it), no
  padding id (padding is segment 0, not a token). `max_sentences` lines are sampled (seeded)
  when the corpus has more. `byte_fallback` spells unknown characters as bytes (needs
  vocab_size > 259), as Llama's tokenizer does.
  """
  import sentencepiece as spm   # the `data` extra

  if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 4:
    raise ValueError(f"--vocab_size: got {vocab_size!r}; allowed: an integer >= 4")
  paths = input_files(pattern)
  folder = os.path.dirname(os.path.abspath(model_prefix))
  os.makedirs(folder, exist_ok=True)
  spm.set_random_generator_seed(seed)
  spm.SentencePieceTrainer.train(
      sentence_iterator=sentences(paths), model_prefix=model_prefix, vocab_size=vocab_size,
      model_type=model_type,
      character_coverage=character_coverage, byte_fallback=byte_fallback,
      input_sentence_size=max_sentences, shuffle_input_sentence=True,
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=os.cpu_count() or 1,
      minloglevel=2)
  return model_prefix + ".model"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--input", required=True, help="glob of text files ('**' recursive)")
  parser.add_argument("--vocab_size", type=int, required=True)
  parser.add_argument("--model_prefix", required=True, help="writes PREFIX.model, PREFIX.vocab")
  parser.add_argument("--model_type", default="unigram", choices=("unigram", "bpe", "char",
                                                                   "word"))
  parser.add_argument("--character_coverage", type=float, default=1.0)
  parser.add_argument("--byte_fallback", action="store_true")
  parser.add_argument("--max_sentences", type=int, default=1_000_000)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  try:
    path = train(args.input, args.vocab_size, args.model_prefix, model_type=args.model_type,
                 character_coverage=args.character_coverage, byte_fallback=args.byte_fallback,
                 max_sentences=args.max_sentences, seed=args.seed)
  except (ValueError, RuntimeError) as e:
    parser.error(str(e))
  print(f"wrote {path}; use --config.data.tokenizer=sentencepiece "
        f"--config.data.tokenizer_model={path}")


if __name__ == "__main__":
  main()
