"""Plain-text source: local files as byte-level tokens (vocab 256), packed into fixed-length rows.

Documents. Each file is one document, read as raw bytes (no decoding, token = byte value).
Split. Each file is cut at byte floor((1 - eval_fraction) * n): 'train' gets the bytes before
the cut, 'eval' the bytes after it, so the splits share no byte and a single file is enough.
Parts shorter than 2 bytes (no next-token pair) are left out.
Packing. A document x_0 .. x_{n-1} gives the n - 1 pairs (input x_t, target x_{t+1}); no pair
crosses a document boundary, so no separator token is needed. Epoch e is the pairs of all
documents in the order of a permutation drawn from the stream (seed, TAG_EPOCH, split, e);
epochs follow each other without a gap, and row r of the resulting endless stream is its pairs
[r S, (r + 1) S); batch i is rows [i B, (i + 1) B). A document that does not fit in the rest of
a row continues at the start of the next row.
Segments. In a row, segment_ids count the document pieces from 1 and positions count from 0
within each piece (a continued document restarts at 0 in its new row: the model attends within
a row only). There is no padding, so every segment id is >= 1.
"""

import numpy as np

from moejax.data import base

BYTE_VOCAB = 256


class TextSource(base.IndexedSource):
  """Packed byte-level batches from local text files (see the module docstring for the layout).

  `next()` returns int32 arrays inputs, targets, segment_ids, positions [B, S]. `loss_floor` is
  None (unknown). `documents` is the list of this split's documents (uint8 arrays) and
  `epoch_order(e)` the order in which epoch e packs them.
  """

  def __init__(self, paths: list[str], batch_size: int, seq_len: int, *, seed: int = 0,
               split: str = "train", eval_fraction: float = 0.1):
    super().__init__()
    self.split_id = base.check_split(split)
    self.split = split
    self.batch_size = base.positive_int(batch_size, "train.batch_size")
    self.seq_len = base.positive_int(seq_len, "train.seq_len")
    self.seed = int(seed)
    if isinstance(eval_fraction, bool) or not isinstance(
        eval_fraction, (int, float)) or not 0.0 < eval_fraction < 1.0:
      raise ValueError(f"data.eval_fraction: got {eval_fraction!r}; allowed: a number in (0, 1)")
    self.documents = []
    for path in paths:
      try:
        data = np.fromfile(path, dtype=np.uint8)
      except OSError as e:
        raise ValueError(f"data.text_glob: the file {path!r} cannot be read ({e}); allowed: "
                         "readable local text files") from None
      cut = int(np.floor((1.0 - eval_fraction) * len(data)))
      part = data[:cut] if split == "train" else data[cut:]
      if len(part) >= 2:
        self.documents.append(part)
    if not self.documents:
      raise ValueError(
          f"data.text_glob: the {len(paths)} file(s) {paths[:3]!r}{'...' if len(paths) > 3 else ''}"
          f" leave no document of >= 2 bytes for split {split!r} with "
          f"data.eval_fraction={eval_fraction}; allowed: files with enough text")
    self._pairs_per_doc = np.array([len(d) - 1 for d in self.documents], np.int64)
    self.epoch_pairs = int(self._pairs_per_doc.sum())
    self._epoch_cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

  @classmethod
  def from_config(cls, config, split: str) -> "TextSource":
    """Builds the source from config.data.{text_glob, eval_fraction, seed},
    config.model.vocab_size (must be >= 256) and config.train.{batch_size, seq_len}."""
    vocab = config.model.vocab_size
    if isinstance(vocab, bool) or not isinstance(vocab, (int, np.integer)) or vocab < BYTE_VOCAB:
      raise ValueError(f"model.vocab_size: got {vocab!r}; allowed: >= {BYTE_VOCAB} for "
                       f"data.source='text' (byte-level tokens)")
    return cls(text_files(config.data.get("text_glob", "")), config.train.batch_size,
               config.train.seq_len, seed=base.data_seed(config), split=split,
               eval_fraction=config.data.get("eval_fraction", 0.1))

  def epoch_order(self, epoch: int) -> np.ndarray:
    """The permutation [num_documents] of `documents` packed in epoch `epoch`."""
    rng = base.make_rng(self.seed, base.TAG_EPOCH, self.split_id, epoch)
    return rng.permutation(len(self.documents))

  def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Epoch `epoch` as pair arrays [N]: inputs, targets (uint8), document-start flags."""
    if epoch not in self._epoch_cache:
      docs = [self.documents[k] for k in self.epoch_order(epoch)]
      inputs = np.concatenate([d[:-1] for d in docs])
      targets = np.concatenate([d[1:] for d in docs])
      starts = np.zeros(len(inputs), bool)
      starts[np.cumsum([0] + [len(d) - 1 for d in docs[:-1]])] = True
      if len(self._epoch_cache) >= 2:       # a batch reads epochs in increasing order
        self._epoch_cache.pop(min(self._epoch_cache))
      self._epoch_cache[epoch] = (inputs, targets, starts)
    return self._epoch_cache[epoch]

  def batch(self, index: int) -> dict[str, np.ndarray]:
    """Batch number `index`: inputs, targets, segment_ids, positions [B, S] int32."""
    b, s, n = self.batch_size, self.seq_len, self.epoch_pairs
    start, need = index * b * s, b * s
    pieces = []
    epoch, offset = divmod(start, n)
    while need > 0:
      take = min(n - offset, need)
      pieces.append([a[offset:offset + take] for a in self._epoch(epoch)])
      need -= take
      epoch, offset = epoch + 1, 0
    inputs, targets, starts = (np.concatenate(p).reshape(b, s) for p in zip(*pieces))
    starts[:, 0] = True                       # every row begins a segment
    segment_ids = np.cumsum(starts, axis=1)
    columns = np.arange(s)
    segment_start = np.maximum.accumulate(np.where(starts, columns, 0), axis=1)
    return {
        "inputs": inputs.astype(np.int32),
        "targets": targets.astype(np.int32),
        "segment_ids": segment_ids.astype(np.int32),
        "positions": (columns - segment_start).astype(np.int32),
    }


def text_files(pattern: str) -> list[str]:
  """Sorted regular files matching the glob `pattern` (`**` recursive, `~` expanded).

  Raises ValueError naming data.text_glob when the pattern is empty or matches no file.
  """
  if not isinstance(pattern, str) or not pattern:
    raise ValueError(f"data.text_glob: got {pattern!r}; allowed: a glob matching local text "
                     f"files, e.g. 'corpus/*.txt' (required for data.source='text')")
  return base.match_files(pattern, "data.text_glob",
                          "a glob matching local text files, e.g. 'corpus/*.txt'")
