"""One registry pattern for everything chosen by name from the config: methods, models, optimizers and
evaluation protocols. An entry is whatever its kind needs (a class, a builder and its defaults); an
unknown name is a one-line ConfigError listing the known ones."""

from __future__ import annotations

from typing import Callable, Dict, Generic, List, TypeVar

from ssl_jax.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):

  def __init__(self, kind: str):
    self.kind = kind  # what an entry is, for messages: "method", "model", ...
    self._entries: Dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator: `@REGISTRY.register("simsiam")` on the entry (a class or a function)."""
    def add(entry: T) -> T:
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is registered twice")
      self._entries[name] = entry
      return entry
    return add

  def get(self, name: str) -> T:
    if name not in self._entries:
      raise ConfigError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
    return self._entries[name]

  def names(self) -> List[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries
