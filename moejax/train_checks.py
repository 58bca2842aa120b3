"""Validation of the fault-handling fields of `config.train` (moejax/faults.py).

`validate_train_faults(config)` raises `ConfigError(field, value, allowed)` before anything is
traced; `moejax.config.validate` calls it.

Not a paper implementation: infrastructure for the training loop (issue 10).
"""
from __future__ import annotations

import ml_collections

from moejax.errors import ConfigError

NAN_POLICIES = ("halt", "skip")


def _int_at_least(t, name: str, low: int) -> None:
  if name not in t:
    raise ConfigError(f"train.{name}", None, "a value (the field is missing)")
  v = t[name]
  if not isinstance(v, int) or isinstance(v, bool) or v < low:
    raise ConfigError(f"train.{name}", v, f"an integer >= {low}")


def validate_train_faults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks `train.nan_policy`, `train.max_skipped_steps`, `train.preemption_check_every` and
  `train.heartbeat_timeout_s`; returns `config`."""
  t = config.train
  if "nan_policy" not in t:
    raise ConfigError("train.nan_policy", None, "a value (the field is missing)")
  if not isinstance(t.nan_policy, str) or t.nan_policy not in NAN_POLICIES:
    raise ConfigError("train.nan_policy", t.nan_policy, f"one of {list(NAN_POLICIES)}")
  _int_at_least(t, "max_skipped_steps", 1)
  _int_at_least(t, "preemption_check_every", 1)
  _int_at_least(t, "heartbeat_timeout_s", 1)
  return config
