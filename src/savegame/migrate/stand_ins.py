"""Inert stand-ins for refused globals: how ``drop_unsafe`` loads a file without what it cannot trust.

Each refused global is replaced, for one load, by a fresh :class:`StandIn` subclass:
building it, calling it or setting its state runs nothing and imports nothing.
The import then finds where the stand-ins sit and drops them (or refuses, when
the state it imports needs one).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar, Self

from savegame.migrate.allowlist import py3_name


class StandIn:
    """Inert stand-in for a refused global: building, calling or setting its state runs nothing."""

    global_name: ClassVar[str] = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<not loaded: {self.global_name}>"


def spellings(name: str) -> set[str]:
    """A global as the pickle spells it and as Python 3 names it (protocol 2 writes some the Python 2 way;
    torch maps back only some of them, pickle all): checks and allowlists must cover both."""
    return {name, py3_name(name)}


def stand_ins_for(names: Iterable[str]) -> dict[str, type[StandIn]]:
    """A fresh StandIn subclass per refused global, under each of its spellings."""
    out: dict[str, type[StandIn]] = {}
    for name in names:
        cls = type("NotLoaded", (StandIn,), {"global_name": py3_name(name)})
        out.update((spelling, cls) for spelling in spellings(name))
    return out


def stand_in_name(value: Any) -> str | None:
    """The global a stand-in (an instance, or the class itself when the pickle only names it) replaced."""
    if isinstance(value, StandIn) or (isinstance(value, type) and issubclass(value, StandIn)):
        return value.global_name
    return None


def stand_ins_in(value: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """(key path, global name) of every StandIn inside ``value``."""
    name = stand_in_name(value)
    if name is not None:
        yield where or "<top level>", name
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from stand_ins_in(key, f"{where}[{key!r}] (key)")
            yield from stand_ins_in(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple, set, frozenset)):
        for index, item in enumerate(value):
            yield from stand_ins_in(item, f"{where}[{index}]")
