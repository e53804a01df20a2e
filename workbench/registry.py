"""A registry per component kind: exact-name lookup, metadata for front ends, errors that list valid names."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar

from .errors import UnknownComponentError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    target: T
    info: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """Maps exact names to builders. Substring matching caused wrong picks elsewhere, so there is none."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, **info: Any) -> Callable[[T], T]:
        def decorate(target: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = Entry(name, target, dict(info))
            return target

        return decorate

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            valid = ", ".join(self.names()) or "(none registered)"
            raise UnknownComponentError(f"Unknown {self.kind} '{name}'. Valid {self.kind} names: {valid}") from None

    def get(self, name: str) -> T:
        return self.entry(name).target

    def info(self, name: str) -> dict[str, Any]:
        return dict(self.entry(name).info)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self.entries())

    def entries(self) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names()]
