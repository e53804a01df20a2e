"""A registry per component kind: exact-name lookup, metadata for front ends, errors that list valid names.

Registering is the only step in adding a component: the decorator declares its name and metadata once, the
registry stamps them onto a registered class, and `discover` imports every module of a component folder, so
a new file is found by being there (a hand-kept import list was the step people forgot, and the component
was then silently missing).
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterable, TypeVar

from .errors import UnknownComponentError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    target: T
    info: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """Maps exact names to builders. Substring matching caused wrong picks elsewhere, so there is none.

    `required`: metadata every registration must declare (the front ends and tests rely on it).
    `check(name, target, info)`: raises ValueError for a registration that contradicts itself.
    `stamp`: a registered class gets `registry_name` and each declared key as class attributes, so the class
    never repeats what its decorator says.
    """

    def __init__(self, kind: str, required: tuple[str, ...] = (), check: Callable[[str, T, dict], None] | None = None,
                 stamp: bool = False):
        self.kind = kind
        self.required = required
        self.check = check
        self.stamp = stamp
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, **info: Any) -> Callable[[T], T]:
        def decorate(target: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            missing = [k for k in self.required if k not in info]
            if missing:
                raise ValueError(f"{self.kind} '{name}' must declare {', '.join(missing)} when it registers")
            if self.check is not None:
                self.check(name, target, info)
            if self.stamp and isinstance(target, type):
                own = [k for k in ("registry_name", *info) if k in vars(target)]
                if own:
                    raise ValueError(f"{self.kind} '{name}': {', '.join(own)} is declared by the registration; "
                                     f"remove it from the class")
                target.registry_name = name
                for key, value in info.items():
                    setattr(target, key, value)
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

    def names(self, **match: Any) -> list[str]:
        """Sorted names; with `match` (e.g. placement="in_llm"), only those declaring exactly these values."""
        return sorted(n for n, e in self._entries.items() if all(e.info.get(k) == v for k, v in match.items()))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self.entries())

    def entries(self) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names()]


def discover(package: str, path: Iterable[str]) -> list[str]:
    """Import every public module (no leading underscore) of `package` found on `path` (its `__path__`), so
    the register decorators in them run; returns the module names."""
    found = [m.name for m in pkgutil.iter_modules(list(path)) if not m.name.startswith("_")]
    for name in found:
        importlib.import_module(f"{package}.{name}")
    return found
