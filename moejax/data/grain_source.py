"""The Grain input pipeline for real corpora: shuffle, tokenize, pack, batch, shard, resume.

Documents (a `grain.MapDataset` of bytes from `moejax.data.records`) flow as
```
shuffle(seed, split) -> repeat (a new order every epoch) -> row stream r: documents r, r+B, ...
  -> tokenize (+ EOS) -> next-token chunks of <= S pairs -> first-fit packing into rows of S
  -> global batch i = row i of every stream r = 0 .. B-1
```
("Grain" docs: `MapDataset`, `IterDataset`, `FirstFitPackIterDataset`, `mp_prefetch`.)

Row streams make the global batch independent of how it is computed. Process p of P runs only
the streams of its rows [p B/P, (p+1) B/P) and returns that [B/P, S] slice, so the union over
processes of their slices is the single-process batch, with no row twice; the trainer turns the
slices into one global array with `jax.make_array_from_process_local_data`. With
`data.worker_count` W > 0, Grain worker processes each run every W-th stream of the process and
send their rows of a batch together; they are put back in stream order, so batches are the
same for every W.

The stream position is Grain's iterator state: `get_state()` gathers every process's part into
one JSON dict (saved in the checkpoint's `extra`), and `set_state()` on each process picks its
own, so resume gives exactly the batches of an uninterrupted run. Without workers the state is
one Grain state per row stream, so a run may resume on a different number of processes; it
needs the same batch size, sequence length and worker count (checked), and with workers the
same number of processes.
"""
from __future__ import annotations

import json
import weakref
from typing import Any

import grain   # the `data` extra: imported only when a Grain source is built
import numpy as np

from moejax.data import base, packing, tokenizers

STATE_FORMAT = "moejax.grain/1"


class _Tokenize:
  """Document bytes -> token ids [N] int32, with the tokenizer's EOS appended when it has one."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def __call__(self, text: bytes) -> np.ndarray:
    ids = self.tokenizer.encode(text)
    if self.tokenizer.eos_id is not None:
      ids = np.append(ids, np.int32(self.tokenizer.eos_id)).astype(np.int32)
    return ids


class _MakeRowStream:
  """Row stream r -> a Grain IterDataset of packed rows from documents r, r + B, r + 2B, ..."""

  def __init__(self, token_docs: grain.MapDataset, num_streams: int, seq_len: int,
               num_bins: int, pack: bool):
    self.token_docs, self.num_streams = token_docs, num_streams
    self.seq_len, self.num_bins, self.pack = seq_len, num_bins, pack

  def __call__(self, r: int) -> grain.IterDataset:
    # No reader threads: a stream reads one document at a time (Grain's default would start 16
    # threads and 500 documents of read-ahead per stream); data.worker_count parallelises.
    docs = self.token_docs[int(r)::self.num_streams].to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    chunks = grain.experimental.FlatMapIterDataset(docs, packing.NextTokenChunks(self.seq_len))
    return packing.pack_rows(chunks, self.seq_len, self.num_bins, self.pack)


class RowStreams(grain.IterDataset):
  """Round robin over row streams: one row of stream 0, 1, ..., n-1, then again from stream 0.

  A Grain IterDataset with no thread of its own. `set_slice` (Grain's in-place slicing hook,
  called by `mp_prefetch`) gives worker w the streams w, w + W, ...; `GrainSource.next` puts
  the workers' rows back in stream order.
  """

  def __init__(self, streams: list[grain.IterDataset]):
    super().__init__()
    self._streams = list(streams)

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    del sequential_slice
    self._streams = self._streams[sl]

  def __iter__(self) -> grain.DatasetIterator:
    return _RowStreamsIterator(self._streams)

  def __str__(self) -> str:
    return f"RowStreams({len(self._streams)} streams)"


class _RowStreamsIterator(grain.DatasetIterator):
  """Iterator of `RowStreams`; its state is every stream's state and the next stream."""

  def __init__(self, streams: list[grain.IterDataset]):
    super().__init__([s.__iter__() for s in streams])
    self._next_stream = 0

  def __next__(self):
    row = next(self._parents[self._next_stream])
    self._next_stream = (self._next_stream + 1) % len(self._parents)
    return row

  def get_state(self) -> dict[str, Any]:
    return {"next_stream": self._next_stream,
            "streams": [it.get_state() for it in self._parents]}

  def set_state(self, state: dict[str, Any]) -> None:
    for it, s in zip(self._parents, state["streams"], strict=True):
      it.set_state(s)
    self._next_stream = int(state["next_stream"])


def shuffle_seed(seed: int, split: str) -> int:
  """The Grain shuffle seed of (data seed, split): unrelated orders for train and eval."""
  ss = np.random.SeedSequence(entropy=int(seed),
                              spawn_key=(base.TAG_GRAIN, base.check_split(split)))
  return int(ss.generate_state(1)[0])


class GrainSource:
  """Packed batches of a document collection through Grain (see the module docstring).

  `next()` returns this process's rows of the next global batch: int32 arrays inputs, targets,
  segment_ids (0 = padding), positions [B/P, S] (B/P = B on one process). `loss_floor` is None.

  Args:
    documents: grain.MapDataset of documents as bytes.
    tokenizer: see `moejax.data.tokenizers` (ids must be < the model's vocabulary).
    batch_size: B, global rows per batch; seq_len: S.
    seed, split: the shuffle is a function of both (`shuffle_seed`).
    num_bins: first-fit packing bins per row stream; pack=False puts one chunk in each row.
    worker_count: Grain worker processes (0: none); must divide B/P.
    process_index, process_count: this process and the number of processes (default: JAX's).
  """

  loss_floor = None

  def __init__(self, documents: grain.MapDataset, tokenizer, *, batch_size: int, seq_len: int,
               seed: int = 0, split: str = "train", num_bins: int = 16, pack: bool = True,
               worker_count: int = 0, process_index: int | None = None,
               process_count: int | None = None):
    if process_index is None or process_count is None:
      import jax
      process_index, process_count = jax.process_index(), jax.process_count()
    self.split = split
    self.batch_size = base.positive_int(batch_size, "train.batch_size")
    self.seq_len = base.positive_int(seq_len, "train.seq_len")
    self.num_bins = base.positive_int(num_bins, "data.packing_bins")
    self.worker_count = _nonneg_int(worker_count, "data.worker_count")
    self.process_index, self.process_count = int(process_index), int(process_count)
    if self.batch_size % self.process_count:
      raise ValueError(f"train.batch_size: got {self.batch_size}; allowed: a multiple of the "
                       f"number of processes ({self.process_count})")
    self.local_batch_size = b = self.batch_size // self.process_count
    if self.worker_count and b % self.worker_count:
      raise ValueError(f"data.worker_count: got {self.worker_count}; allowed: 0 or a divisor of "
                       f"the rows per process, train.batch_size / processes = {b}")
    if not isinstance(pack, bool):
      raise ValueError(f"data.pack: got {pack!r}; allowed: True or False")
    self.tokenizer = tokenizer
    token_docs = (documents.shuffle(seed=shuffle_seed(seed, split)).repeat()
                  .map(_Tokenize(tokenizer)))
    self.first_row = first = self.process_index * b
    stream = _MakeRowStream(token_docs, self.batch_size, self.seq_len, self.num_bins, pack)
    rows = RowStreams([stream(r) for r in range(first, first + b)])
    if self.worker_count:
      # Worker w sends its b/W rows of a batch (streams w, w+W, ...) as one element: one
      # transfer per worker and batch, not per row; `next` puts the rows back in stream order.
      _absl_flags_parsed()
      rows = rows.batch(b // self.worker_count).mp_prefetch(
          grain.MultiprocessingOptions(num_workers=self.worker_count))
    self._rows = iter(rows)
    # Close Grain's worker processes before interpreter teardown (quiet exits).
    self._finalizer = weakref.finalize(self, _close, self._rows)

  @classmethod
  def from_config(cls, config, split: str, documents: grain.MapDataset) -> "GrainSource":
    """Builds the pipeline from config.data.{tokenizer, tokenizer_model, seed, packing_bins,
    pack, worker_count} and config.train.{batch_size, seq_len} over `documents`."""
    return cls(documents, tokenizers.make_tokenizer(config),
               batch_size=config.train.batch_size, seq_len=config.train.seq_len,
               seed=base.data_seed(config), split=split,
               num_bins=config.data.get("packing_bins", 16), pack=config.data.get("pack", True),
               worker_count=config.data.get("worker_count", 0))

  def next(self) -> dict[str, np.ndarray]:
    """This process's rows of the next global batch: 4 int32 arrays [B/P, S]."""
    if self.worker_count:
      groups = [next(self._rows) for _ in range(self.worker_count)]     # [W][b/W, S]
      # Row j of worker w is stream w + W j: interleave the groups back into stream order.
      return {k: np.stack([g[k] for g in groups], axis=1).reshape(self.local_batch_size, -1)
              for k in packing.BATCH_KEYS}
    rows = [next(self._rows) for _ in range(self.local_batch_size)]
    return {k: np.stack([row[k] for row in rows]) for k in packing.BATCH_KEYS}

  __next__ = next

  def __iter__(self):
    return self

  def local_state(self) -> dict[str, Any]:
    """This process's part of `get_state()`: {'streams': {row: state}} without workers (one
    Grain state per row stream), else {'processes': {process: state of its worker pool}}."""
    state = self._rows.get_state()
    if self.worker_count:
      return {"processes": {str(self.process_index): state}}
    return {"streams": {str(self.first_row + i): s for i, s in enumerate(state["streams"])}}

  def get_state(self) -> dict[str, Any]:
    """The stream position of all processes, one JSON dict (a collective on several hosts).

    Without workers it holds one Grain state per row stream, so a run can resume on another
    number of processes; with workers, one state per process (resume on as many).
    """
    merged = {}
    for part in _gather_process_states(self.local_state()):
      for key, value in part.items():
        merged.setdefault(key, {}).update(value)
    meta = {"format": STATE_FORMAT, "batch_size": self.batch_size, "seq_len": self.seq_len,
            "worker_count": self.worker_count}
    if self.worker_count:
      meta["process_count"] = self.process_count
    return {**meta, **merged}

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores a `get_state()` result: the following batches equal an uninterrupted run's."""
    want = {"format": STATE_FORMAT, "batch_size": self.batch_size, "seq_len": self.seq_len,
            "worker_count": self.worker_count}
    if self.worker_count:
      want["process_count"] = self.process_count
    got = {k: state.get(k) for k in want} if isinstance(state, dict) else state
    keys = ([str(r) for r in range(self.first_row, self.first_row + self.local_batch_size)]
            if not self.worker_count else [str(self.process_index)])
    part = state.get("processes" if self.worker_count else "streams", {}) if got == want else {}
    if got != want or not all(k in part for k in keys):
      raise ValueError(f"data state: got {_brief(got)}; allowed: a state saved by this data "
                       f"pipeline with {want} (the batch size, sequence length and "
                       f"data.worker_count of the saved run"
                       + (", and as many processes)" if self.worker_count else ")"))
    if self.worker_count:
      self._rows.set_state(part[keys[0]])
    else:
      self._rows.set_state({"next_stream": 0, "streams": [part[k] for k in keys]})

  def close(self) -> None:
    """Stops Grain's worker processes (if any); the source is unusable after."""
    self._finalizer()


def _close(iterator) -> None:
  close = getattr(iterator, "close", None)
  if close is not None:
    close()


def _nonneg_int(value, field: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(f"{field}: got {value!r}; allowed: an integer >= 0")
  return int(value)


def _brief(value, limit: int = 200) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + "..."


def _absl_flags_parsed() -> None:
  """Grain's worker processes read absl flags; outside an absl app they were never parsed."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _gather_process_states(local: dict) -> list[dict]:
  """[local state of process p for p = 0 .. P-1] over all JAX processes ([local] on one host).

  Several hosts: every process must call this at the same step (the trainer does so when it
  saves a checkpoint); the JSON texts are all-gathered as padded uint8 arrays.
  """
  import jax
  if jax.process_count() == 1:
    return [local]
  from jax.experimental import multihost_utils
  raw = np.frombuffer(json.dumps(local).encode("utf-8"), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int32)))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:raw.size] = raw
  texts = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(texts[p, :int(sizes[p, 0])].tobytes().decode("utf-8"))
          for p in range(texts.shape[0])]
