"""Packing documents into fixed-length rows with segment ids and per-segment positions.

A document of N token ids x_0 .. x_{N-1} gives the N - 1 next-token pairs (x_t, x_{t+1}); no
pair crosses a document boundary. A document with more than S pairs is split into consecutive
chunks of at most S pairs, each its own segment (positions restart at 0: the model attends
within a chunk only). Chunks are then packed into rows of S positions by first-fit over
`num_bins` open rows ("Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer", Raffel et al. 2020, arXiv:1910.10683, packs examples the same way; the packer is
Grain's `FirstFitPackIterDataset`): a chunk goes into the first open row with room; when none
has room, all open rows are emitted and packing starts again with that chunk. In a row,
segment_ids count the chunks from 1, positions count from 0 within each chunk, and the unused
tail is padding: segment id 0, token 0, position 0. The model masks attention across segments
(moejax.model) and the trainer gives padding zero loss weight.

With `pack=False` every row holds exactly one chunk (the unpacked layout, for checking that
packing changes no per-token loss).
"""
from __future__ import annotations

import grain   # the `data` extra: this module is imported only by the Grain sources
import numpy as np

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions")


def next_token_chunks(ids: np.ndarray, seq_len: int) -> list[dict[str, np.ndarray]]:
  """Splits one document into next-token chunks of at most `seq_len` pairs.

  ids: [N] int. Returns ceil((N - 1) / S) dicts {'inputs': [n_k], 'targets': [n_k]} int32 with
  inputs = ids[kS : kS + n_k] and targets = ids[kS + 1 : kS + 1 + n_k]; [] when N < 2.
  """
  ids = np.asarray(ids, np.int32)
  pairs = len(ids) - 1
  return [{"inputs": ids[start:min(start + seq_len, pairs)],
           "targets": ids[start + 1:min(start + seq_len, pairs) + 1]}
          for start in range(0, max(pairs, 0), seq_len)]


class NextTokenChunks(grain.experimental.FlatMapTransform):
  """Grain FlatMap: one tokenized document [N] -> its `next_token_chunks` of at most S pairs."""

  max_fan_out = 1 << 30   # an IterDataset flat map buffers one document's chunks: no cap needed

  def __init__(self, seq_len: int):
    self.seq_len = seq_len

  def flat_map(self, ids):
    return next_token_chunks(ids, self.seq_len)


def pack_rows(chunks, seq_len: int, num_bins: int, pack: bool = True):
  """Grain IterDataset of chunks {'inputs', 'targets': [n <= S]} -> rows of the model batch.

  Each output row is a dict of [S] int32 arrays `BATCH_KEYS` (see the module docstring).
  Grain's first-fit packer keeps its position in the checkpointable iterator state.
  """
  packed = grain.experimental.FirstFitPackIterDataset(
      chunks, length_struct={"inputs": seq_len, "targets": seq_len}, num_packing_bins=num_bins,
      shuffle_bins=False, max_sequences_per_bin=None if pack else 1)
  return packed.map(_model_row)


def _model_row(row: dict) -> dict[str, np.ndarray]:
  """Grain's packed keys -> ours: inputs, targets, segment_ids, positions [S] int32."""
  return {"inputs": row["inputs"].astype(np.int32), "targets": row["targets"].astype(np.int32),
          "segment_ids": row["inputs_segment_ids"].astype(np.int32),
          "positions": row["inputs_positions"].astype(np.int32)}
