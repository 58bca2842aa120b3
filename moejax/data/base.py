"""What every data source shares: splits, per-batch RNG streams, and index-addressed resume.

A source is a pure function `batch(index) -> dict` of (its config, its split, the index). The
stream state is therefore one integer, and resuming is setting it: batches after `set_state`
equal those of an uninterrupted run by construction, whatever happened before.
"""
import glob
import os
from typing import Any

import numpy as np

SPLITS = ("train", "eval")

# First element of every SeedSequence spawn key: the same data seed gives unrelated streams for
# the different things drawn from it.
TAG_LANGUAGE = 0   # the synthetic language itself (Markov chains)
TAG_BATCH = 1      # synthetic batches: (TAG_BATCH, split, batch index)
TAG_EPOCH = 2      # text document order: (TAG_EPOCH, split, epoch)
TAG_GRAIN = 3      # Grain sources' shuffle seed: (TAG_GRAIN, split)


def check_split(split: str) -> int:
  """Returns the integer id of `split` (its index in SPLITS); raises ValueError if unknown."""
  if split not in SPLITS:
    raise ValueError(f"data split: got {split!r}; allowed: {', '.join(SPLITS)}")
  return SPLITS.index(split)


def make_rng(seed: int, *key: int) -> np.random.Generator:
  """A Philox generator for the stream (seed, *key).

  Distinct keys give independent streams (numpy SeedSequence spawn keys), so e.g. batch i of
  'train' and batch j of 'eval' come from different streams for all i, j.
  """
  ss = np.random.SeedSequence(entropy=int(seed), spawn_key=tuple(int(k) for k in key))
  return np.random.Generator(np.random.Philox(ss))


def positive_int(value: Any, field: str) -> int:
  """Returns `value` as an int if it is a positive integer, else raises naming `field`."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{field}: got {value!r}; allowed: an integer >= 1")
  return int(value)


def data_seed(config) -> int:
  """The data seed of `config`: config.data.seed if set, else config.seed (default 0)."""
  seed = config.data.get("seed", None)
  if seed is None:
    seed = config.get("seed", 0)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"data.seed: got {seed!r}; allowed: an integer >= 0")
  return int(seed)


class IndexedSource:
  """A stream of batches addressed by index, with JSON-serialisable resume state.

  Subclasses implement `batch(index)`; `next()` returns `batch(i)` for i = 0, 1, 2, ...
  `get_state()` is `{'index': i}` (the index of the batch `next()` returns next).
  """

  loss_floor: float | None = None

  def __init__(self):
    self._index = 0

  def batch(self, index: int) -> dict[str, np.ndarray]:
    """Batch number `index` of this split; a pure function of (config, split, index)."""
    raise NotImplementedError

  def next(self) -> dict[str, np.ndarray]:
    """The next batch of the stream (see the subclass for its arrays and shapes)."""
    out = self.batch(self._index)
    self._index += 1
    return out

  __next__ = next

  def __iter__(self):
    return self

  def get_state(self) -> dict[str, int]:
    """JSON-serialisable stream position: {'index': number of batches already returned}."""
    return {"index": int(self._index)}

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores a `get_state()` result: the following batches equal an uninterrupted run's."""
    index = state.get("index") if isinstance(state, dict) else None
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
      raise ValueError(f"data state: got {state!r}; allowed: {{'index': an integer >= 0}}")
    self._index = int(index)


def match_files(pattern: str, field: str, allowed: str) -> list[str]:
  """Sorted regular files matching the glob `pattern` (`**` recursive, `~` expanded); raises
  ValueError naming `field` and what is `allowed` when none match."""
  paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                 if os.path.isfile(p))
  if not paths:
    raise ValueError(f"{field}: got {pattern!r}, which matches no file; allowed: {allowed}")
  return paths


def existing_path(value: Any, field: str, kind: str, allowed: str, required_for: str) -> str:
  """`value` with `~` expanded, if it names an existing `kind` ("file" or "directory"); else
  raises ValueError naming `field`, the value and what is `allowed` (`required_for` says why an
  empty value is not enough)."""
  if not isinstance(value, str) or not value:
    raise ValueError(f"{field}: got {value!r}; allowed: {allowed} ({required_for})")
  path = os.path.expanduser(value)
  if not (os.path.isfile if kind == "file" else os.path.isdir)(path):
    raise ValueError(f"{field}: got {path!r}, which is not a {kind}; allowed: {allowed}")
  return path
