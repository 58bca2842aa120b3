"""Is the input the bottleneck? Grain pipeline tokens/s vs the default model's train-step tokens/s.

In one process this
  1. writes a synthetic English-like corpus (Zipf-distributed words, log-normal document
     lengths around 250 words, like web text) and builds it as a TFDS dataset in ArrayRecord
     format (`moejax.data.tfds_builder`), and trains a 128-piece SentencePiece model on it;
  2. times the real-corpus pipeline (`data.source=tfds:...`: TFDS data source -> Grain shuffle
     -> tokenize -> first-fit packing -> batches) with the byte and SentencePiece tokenizers,
     with and without Grain worker processes, at configs/default.py's batch shape;
  3. times configs/default.py's jitted train step on batches of that pipeline (the
     SentencePiece vocabulary fits its 128-token embedding);
and prints both in tokens/s (batch_size * seq_len per batch, padding included, as the trainer
counts) and their ratio: a ratio well above 1 means the input keeps up with training.

    python benchmarks/input_pipeline.py            # about a minute on 2 CPU cores
    python benchmarks/input_pipeline.py --quick    # smaller corpus and fewer batches
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from moejax.config import load_config_file  # noqa: E402
from moejax import data  # noqa: E402
from moejax.data import tfds_builder, train_tokenizer  # noqa: E402
from moejax.train import Trainer  # noqa: E402


def load_default_config():
  """configs/default.py's `get_config()`."""
  return load_config_file(os.path.join(REPO, "configs", "default.py"))


def write_corpus(folder: str, num_docs: int, seed: int = 0) -> None:
  """`num_docs` train and num_docs/10 validation documents of Zipf(1.1) words over a 5,000-word
  vocabulary, ~250 words each (log-normal), one .txt file per document."""
  rng = np.random.default_rng(seed)
  letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
  vocab = ["".join(rng.choice(letters, rng.integers(1, 9))) for _ in range(5000)]
  for split, n in (("train", num_docs), ("validation", max(num_docs // 10, 1))):
    os.makedirs(os.path.join(folder, split), exist_ok=True)
    for i in range(n):
      length = int(np.clip(rng.lognormal(np.log(250), 0.8), 5, 4000))
      words = rng.zipf(1.1, length) % len(vocab)
      text = " ".join(vocab[w] for w in words) + "."
      with open(os.path.join(folder, split, f"{i:06d}.txt"), "w") as f:
        f.write(text)


def time_pipeline(config, min_seconds: float, max_batches: int):
  """(tokens/s, fraction of non-padding tokens, batches) of data.make_source(config, 'train')."""
  source = data.make_source(config, "train")
  try:
    for _ in range(3):               # start-up (and worker spawn) outside the timing
      source.next()
    real = total = batches = 0
    tic = time.perf_counter()
    while batches < max_batches and (time.perf_counter() - tic < min_seconds or batches < 10):
      batch = source.next()
      real += int((batch["segment_ids"] > 0).sum())
      total += batch["segment_ids"].size
      batches += 1
    elapsed = time.perf_counter() - tic
  finally:
    if hasattr(source, "close"):
      source.close()
  return total / elapsed, real / total, batches


def time_train_step(config, steps: int) -> float:
  """Tokens/s of the default model's jitted train step on batches of `config`'s pipeline."""
  source = data.make_source(config, "train")
  trainer = Trainer(config)
  state = trainer.init_state()
  batches = [trainer.put_batch(source.next()) for _ in range(steps + 3)]
  for b in batches[:3]:              # compile and warm up
    state, out = trainer.train_step(state, b)
  jax.block_until_ready(out)
  tic = time.perf_counter()
  for b in batches[3:]:
    state, out = trainer.train_step(state, b)
  jax.block_until_ready(out)
  elapsed = time.perf_counter() - tic
  return steps * config.train.batch_size * config.train.seq_len / elapsed


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a smaller run, for a smoke test")
  parser.add_argument("--workers", default="0,2", help="comma-separated data.worker_count values")
  args = parser.parse_args()
  num_docs, seconds, max_batches, steps = ((200, 1.0, 200, 5) if args.quick
                                           else (2000, 5.0, 5000, 30))
  workers = [int(w) for w in args.workers.split(",")]

  with tempfile.TemporaryDirectory() as tmp:
    tic = time.perf_counter()
    write_corpus(os.path.join(tmp, "corpus"), num_docs)
    tfds_builder.build(os.path.join(tmp, "corpus"), os.path.join(tmp, "tfds"))
    model = train_tokenizer.train(os.path.join(tmp, "corpus", "train", "*.txt"), 128,
                                  os.path.join(tmp, "sp128"))
    prep = time.perf_counter() - tic

    base = load_default_config()
    base.data.source = "tfds:moejax_local_text"
    base.data.tfds_data_dir = os.path.join(tmp, "tfds")
    tokenizer_configs = {
        "byte (vocab 256)": {"tokenizer": "byte"},
        "sentencepiece (vocab 128)": {"tokenizer": "sentencepiece", "tokenizer_model": model},
    }
    b, s = base.train.batch_size, base.train.seq_len
    print(f"corpus: {num_docs} train documents (~250 words each), TFDS build + tokenizer "
          f"training {prep:.1f} s; batch {b} x {s} tokens, data.packing_bins="
          f"{base.data.packing_bins}, {os.cpu_count()} CPU cores\n")
    print(f"{'pipeline':<28} {'workers':>7} {'tokens/s':>12} {'non-padding':>12} {'batches':>8}")
    results = {}
    for name, fields in tokenizer_configs.items():
      for w in workers:
        config = load_default_config()
        config.data.update(base.data)
        config.data.update(fields)
        config.data.worker_count = w
        config.model.vocab_size = max(config.model.vocab_size, 256 if "byte" in name else 128)
        tps, fill, n = time_pipeline(config, seconds, max_batches)
        results[(name, w)] = tps
        print(f"{name:<28} {w:>7} {tps:>12,.0f} {fill:>11.1%} {n:>8}")

    config = load_default_config()
    config.data.update(base.data)
    config.data.update(tokenizer_configs["sentencepiece (vocab 128)"])
    train_tps = time_train_step(config, steps)
    print(f"\ntrain step, configs/default.py (fed by the sentencepiece pipeline): "
          f"{train_tps:,.0f} tokens/s")
    for (name, w), tps in results.items():
      print(f"ratio pipeline / train step, {name}, workers={w}: {tps / train_tps:,.1f}x")


if __name__ == "__main__":
  main()
