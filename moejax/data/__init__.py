"""Input pipeline: data sources looked up by `config.data.source`, pure numpy on the host.

`make_source(config, split)` returns an object with
  next() -> dict of numpy int32 arrays: inputs, targets, segment_ids, positions [B, S]
            (+ domain [B] for synthetic data: analysis only, never given to the model);
  get_state() -> {'index': int}, set_state(state): resume exactly where a run stopped;
  loss_floor: float | None, nats per target token.
B = config.train.batch_size, S = config.train.seq_len. See docs/ARCHITECTURE.md, "Data".
"""
from typing import Callable

from moejax.data.base import SPLITS, IndexedSource
from moejax.data.synthetic import MarkovMixture, SyntheticSource
from moejax.data.text import TextSource

# name -> factory(config, split). Later issues (TFDS, array_record) add entries here.
SOURCES: dict[str, Callable[..., IndexedSource]] = {
    "synthetic": SyntheticSource.from_config,
    "text": TextSource.from_config,
}


def register_source(name: str, factory: Callable[..., IndexedSource]) -> None:
  """Adds a source `factory(config, split)` under `name` (a value of config.data.source)."""
  if name in SOURCES:
    raise ValueError(f"data.source: {name!r} is already registered")
  SOURCES[name] = factory


def make_source(config, split: str) -> IndexedSource:
  """The data stream of `split` ('train' or 'eval') for `config` (config.data.source picks it).

  Raises ValueError naming data.source for an unknown source, and naming the field at fault
  for any other bad value.
  """
  name = config.data.get("source", "synthetic")
  if name not in SOURCES:
    raise ValueError(f"data.source: got {name!r}; allowed: {', '.join(sorted(SOURCES))}")
  return SOURCES[name](config, split)


def make_sources(config) -> dict[str, IndexedSource]:
  """{split: make_source(config, split)} for every split ('train', 'eval')."""
  return {split: make_source(config, split) for split in SPLITS}


__all__ = ["SOURCES", "SPLITS", "IndexedSource", "MarkovMixture", "SyntheticSource",
           "TextSource", "make_source", "make_sources", "register_source"]
