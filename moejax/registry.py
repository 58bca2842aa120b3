"""The one registry helper: name -> component, for every kind of component looked up by a
config string (routers, dispatch, grouped-matmul backends, FFN forms, data sources, tokenizers,
scaling laws). The pattern of big_vision's registry: registering a name twice is an error, and
an unknown name is a `ConfigError` naming the config field and the names allowed."""
from __future__ import annotations

from typing import Any, Iterator, Mapping

from moejax.errors import ConfigError


class Registry(Mapping):
  """A read-only mapping name -> component, filled by `register`.

  Args:
    field: the config field whose value is looked up here, e.g. `model.moe.router`; named in
      the error for an unknown name.
    items: components to start with.
  """

  def __init__(self, field: str, items: Mapping[str, Any] | None = None):
    self.field = field
    self._items: dict[str, Any] = {}
    for name, component in (items or {}).items():
      self.register(name, component)

  def register(self, name: str, component: Any = None) -> Any:
    """Adds `component` under `name`; without `component`, a decorator that adds its target."""
    if component is None:
      return lambda target: self.register(name, target)
    if name in self._items:
      raise ValueError(f"{self.field}: {name!r} is registered twice")
    self._items[name] = component
    return component

  def __getitem__(self, name: str) -> Any:
    if not isinstance(name, str) or name not in self._items:
      raise ConfigError(self.field, name, f"one of {sorted(self._items)}")
    return self._items[name]

  def __contains__(self, name: object) -> bool:
    return name in self._items

  def __iter__(self) -> Iterator[str]:
    return iter(self._items)

  def __len__(self) -> int:
    return len(self._items)

  def check(self, name: Any) -> None:
    """Raises ConfigError naming this registry's field if `name` is unknown."""
    self[name]

  def __repr__(self) -> str:
    return f"Registry({self.field!r}, {sorted(self._items)})"

