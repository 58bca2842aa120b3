"""Mixtral-like MoE on C4 (or any TFDS text corpus) through the Grain pipeline.

8 experts, top-2, softmax after the top-k, dropless (Jiang et al. 2024, "Mixtral of Experts",
arXiv:2401.04088) on C4 (Raffel et al. 2020, arXiv:1910.10683) with a 32k SentencePiece
vocabulary (Kudo & Richardson 2018, arXiv:1808.06226), packed 1,024-token rows. About 0.34B
parameters (0.11B active per token; moejax.scaling.accounting): an accelerator run, not a CPU one.

Prepare the data once (README, "Real corpora"), then e.g.

  python -m moejax.main --config=configs/c4_mixtral_like.py --workdir=runs/c4 \\
      --config.data.tfds_data_dir=$HOME/tensorflow_datasets \\
      --config.data.tokenizer_model=tokenizers/c4_32k.model

For LM1B: --config.data.source=tfds:lm1b --config.data.eval_split=test.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import mixtral_like  # noqa: E402


def get_config():
  c = mixtral_like.get_config()
  m = c.model
  m.vocab_size = 32_000      # >= the tokenizer's vocabulary (checked at start-up)
  m.d_model = 768
  m.num_layers = 8
  m.num_heads = 12
  m.num_kv_heads = 4
  m.head_dim = 64
  m.d_ff = 2048              # per expert
  m.max_len = 1024
  m.dtype = "bfloat16"
  m.moe.lb_loss_weight = 0.01
  m.moe.z_loss_weight = 0.001

  t = c.train
  t.steps = 20_000
  t.batch_size = 64          # global rows; each of P processes loads batch_size / P of them
  t.seq_len = 1024
  t.lr = 3e-4
  t.warmup_steps = 1_000
  t.weight_decay = 0.1
  t.eval_every = 1_000
  t.eval_batches = 16
  t.checkpoint_every = 1_000
  t.log_every = 50

  d = c.data
  d.source = "tfds:c4/en"
  d.tfds_data_dir = ""       # required: where the dataset was prepared (array_record)
  d.train_split = "train"
  d.eval_split = "validation"
  d.tokenizer = "sentencepiece"
  d.tokenizer_model = ""     # required: e.g. from python -m moejax.data.train_tokenizer
  d.pack = True
  d.packing_bins = 16
  d.worker_count = 4         # Grain worker processes per host (must divide batch_size / P)
  return c
