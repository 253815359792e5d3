"""One small registry: ``@REGISTRY.register("name")`` and ``REGISTRY.get("name")`` with "did you mean", and the
option lookup ``look_up`` they share with every other "unknown X; choose one of" check."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Callable, Collection, Generic, Mapping, TypeVar, overload

from medssl.errors import InputError

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")


def did_you_mean(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """Return `` (did you mean 'x'?)`` for the closest choice, or ``""`` when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


@overload
def look_up(value: Any, choices: Mapping[Any, V], *, what: str, path: str | Path | None = None) -> V: ...


@overload
def look_up(value: K, choices: Collection[Any], *, what: str, path: str | Path | None = None) -> K: ...


def look_up(value: Any, choices: Mapping[Any, Any] | Collection[Any], *, what: str,
            path: str | Path | None = None) -> Any:
    """``value`` if it is one of ``choices`` (``choices[value]`` when ``choices`` is a mapping), else an
    ``InputError`` ``unknown {what} '{value}' (did you mean 'x'?); choose one of: a, b, c`` naming ``path``.

    The choices are listed in their given order; the hint appears only when one is close (``did_you_mean``).
    A value that cannot be looked up at all (e.g. an unhashable list against a mapping) is unknown too.
    """
    try:
        found = value in choices
    except TypeError:
        found = False
    if found:
        return choices[value] if isinstance(choices, Mapping) else value
    names = [str(choice) for choice in choices]
    raise InputError(f"unknown {what} '{value}'{did_you_mean(str(value), names)}; choose one of: {', '.join(names)}",
                     path=path)


class Registry(Generic[T]):
    """Maps names (= file names = config names) to classes or factories."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        return self._items[look_up(name, self.names(), what=self.kind)]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
