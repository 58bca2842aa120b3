"""Input pipeline: data sources looked up by `config.data.source`, pure numpy on the host.

`make_source(config, split)` returns an object with
  next() -> dict of numpy int32 arrays: inputs, targets, segment_ids, positions [B, S]
            (+ domain [B] for synthetic data: analysis only, never given to the model);
            Grain sources return this process's rows [B/P, S] of the global batch;
  get_state() -> a JSON-serialisable dict, set_state(state): resume exactly where a run stopped;
  loss_floor: float | None, nats per target token.
B = config.train.batch_size, S = config.train.seq_len. See docs/ARCHITECTURE.md, "Data".

config.data.source is a registry key, optionally followed by ':' and an argument:
`synthetic`, `text`, `tfds:<name>[/<config>]`, `array_record:<glob>`. The real-corpus sources
need the `data` extra (grain, tensorflow-datasets, sentencepiece), imported only when used.
"""
from typing import Callable

from moejax.data.base import SPLITS, IndexedSource, check_split
from moejax.data.synthetic import MarkovMixture, SyntheticSource
from moejax.data.text import TextSource
from moejax.errors import ConfigError
from moejax.registry import Registry


def _grain_source(documents_fn_name: str) -> Callable:
  """factory(config, split) building a GrainSource over `records.<documents_fn_name>`."""

  def factory(config, split: str):
    try:
      from moejax.data import grain_source, records
    except ImportError as e:
      raise ValueError(f"data.source: got {config.data.source!r}, which needs the `data` extra "
                       f"({e}); allowed: after `pip install -e .[data]`") from None
    check_split(split)
    documents = getattr(records, documents_fn_name)(config, split)
    return grain_source.GrainSource.from_config(config, split, documents)

  factory.__doc__ = (f"A GrainSource (moejax.data.grain_source) over "
                     f"moejax.data.records.{documents_fn_name}(config, split).")
  return factory


# name -> factory(config, split); the name is config.data.source up to its first ':'.
SOURCES = Registry("data.source", {
    "synthetic": SyntheticSource.from_config,
    "text": TextSource.from_config,
    "tfds": _grain_source("tfds_documents"),
    "array_record": _grain_source("array_record_documents"),
})


def register_source(name: str, factory: Callable[..., IndexedSource]) -> None:
  """Adds a source `factory(config, split)` under `name` (a value of config.data.source)."""
  SOURCES.register(name, factory)


def source_name(source: str) -> str:
  """The registry key of a config.data.source value: 'tfds:c4/en' -> 'tfds'."""
  return source.partition(":")[0] if isinstance(source, str) else source


def make_source(config, split: str) -> IndexedSource:
  """The data stream of `split` ('train' or 'eval') for `config` (config.data.source picks it).

  Raises ValueError naming data.source for an unknown source, and naming the field at fault
  for any other bad value.
  """
  source = config.data.get("source", "synthetic")
  name = source_name(source)
  if name not in SOURCES:
    raise ConfigError("data.source", source, f"one of {sorted(SOURCES)} "
                      "(tfds:<name>[/<config>], array_record:<glob>)")
  return SOURCES[name](config, split)


def make_sources(config) -> dict[str, IndexedSource]:
  """{split: make_source(config, split)} for every split ('train', 'eval')."""
  return {split: make_source(config, split) for split in SPLITS}


__all__ = ["SOURCES", "SPLITS", "IndexedSource", "MarkovMixture", "SyntheticSource",
           "TextSource", "make_source", "make_sources", "register_source", "source_name"]
