"""The one error type for bad configuration. Imports nothing of moejax, so every module can
raise it without an import cycle."""
from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
  """A config field holds a value outside what is allowed.

  Attributes:
    field: dotted path of the field, e.g. `model.moe.top_k`.
    value: the offending value.
    allowed: what would have been accepted, in words.
  """

  def __init__(self, field: str, value: Any, allowed: str):
    self.field, self.value, self.allowed = field, value, allowed
    super().__init__(f"config field `{field}` = {value!r} is not allowed: expected {allowed}")
