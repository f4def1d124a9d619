"""Reading a saved DataLoader state: every field checked, and whether it fits this loader.

:func:`parse` turns a state into typed values or raises one IncompatibleStateError
naming the bad field, before anything is changed. :func:`check` compares the saved
settings with the loader's and refuses, with the remedy, a change that makes the
rest of a saved epoch undefined.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from savegame.data.fetch import SlotState
from savegame.data.stream import SlotStart
from savegame.errors import IncompatibleStateError

VERSION = 1
_REQUIRED = ("version", "kind", "seed", "epoch", "in_progress", "position", "batch_size", "drop_last", "length")
_DAMAGED = "the checkpoint is damaged or was not written by savegame.DataLoader"


@dataclass
class Saved:
    """A parsed DataLoader state. ``settings`` are the values a mid-epoch resume needs unchanged."""

    kind: str
    seed: int
    epoch: int
    in_progress: bool
    position: int
    settings: dict[str, Any]
    done: set[int] = field(default_factory=set)
    sampler: Any = None
    sampler_ended: bool = False
    pending: dict[int, Any] = field(default_factory=dict)
    generators: list[torch.Tensor] = field(default_factory=list)
    dataset: Any = None
    slots: list[SlotStart] = field(default_factory=list)
    next_slot: int = 0

    @property
    def mid_epoch(self) -> bool:
        return self.in_progress and (self.position > 0 or bool(self.done) or any(s.batches for s in self.slots))


def slot_count(kind: str, num_workers: int) -> int:
    """Worker slots an iterable dataset is read in: 0 and 1 workers both read it as one stream."""
    return max(1, num_workers) if kind == "iterable" else 0


def parse(state: Any) -> Saved:
    """The typed content of ``state``, or IncompatibleStateError naming the first bad field."""
    if not isinstance(state, Mapping):
        raise IncompatibleStateError(f"a savegame.DataLoader state is a mapping, got {type(state).__name__}")
    missing = [key for key in _REQUIRED if key not in state]
    if missing:
        raise IncompatibleStateError(
            f"the DataLoader state lacks {missing}: it was not saved by savegame.DataLoader "
            "(a plain torch DataLoader's state cannot resume one)"
        )
    if state["version"] != VERSION:
        raise IncompatibleStateError(
            f"DataLoader state version {state['version']!r} is not supported (this savegame reads {VERSION})")
    kind = state["kind"]
    if kind not in ("map", "iterable"):
        raise IncompatibleStateError(f"DataLoader state field 'kind' must be 'map' or 'iterable', got {kind!r}; "
                                     + _DAMAGED)
    settings = {"batch_size": _int(state, "batch_size", 1, none=True), "drop_last": _bool(state, "drop_last"),
                "length": _int(state, "length", 0, none=True)}
    saved = Saved(kind, _int(state, "seed", None), _int(state, "epoch"), _bool(state, "in_progress"),
                  _int(state, "position"), settings)
    if kind == "iterable":
        _parse_iterable(state, saved)
    else:
        _parse_map(state, saved)
    return saved


def _parse_map(state: Mapping[str, Any], saved: Saved) -> None:
    saved.done = {_item_int("done", p) for p in _list(state, "done")}
    saved.sampler, saved.dataset = state.get("sampler"), state.get("dataset")
    saved.sampler_ended = _bool(state, "sampler_ended") if "sampler_ended" in state else False
    for pair in _list(state, "pending"):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise IncompatibleStateError(f"DataLoader state field 'pending' holds {pair!r}, not a "
                                         f"[position, indices] pair; {_DAMAGED}")
        position = _item_int("pending", pair[0])
        if position < saved.position or position in saved.done:
            raise IncompatibleStateError(f"DataLoader state field 'pending' names batch {position}, which was "
                                         f"consumed already; {_DAMAGED}")
        saved.pending[position] = pair[1]
    saved.generators = [_generator_state(value) for value in _list(state, "generators")]


def _parse_iterable(state: Mapping[str, Any], saved: Saved) -> None:
    saved.settings["num_workers"] = _int(state, "num_workers")
    for slot in _list(state, "slots"):
        if not isinstance(slot, Mapping) or not {"batches", "state", "ended"} <= slot.keys():
            raise IncompatibleStateError(f"DataLoader state field 'slots' holds {slot!r}, not a worker slot; "
                                         + _DAMAGED)
        held = SlotState(slot["state"], slot.get("iterator"))
        saved.slots.append(SlotStart(_item_int("slots", slot["batches"]), held, _bool(slot, "ended")))
    saved.next_slot = _int(state, "next_slot") if "next_slot" in state else 0


def check(saved: Saved, current: Mapping[str, Any]) -> str | None:
    """Raise IncompatibleStateError if ``saved`` cannot resume a loader whose settings are ``current``.

    ``current`` holds this loader's ``kind``, ``batch_size``, ``drop_last``,
    ``length`` and ``num_workers``. A change that moves the saved position
    inside an epoch is refused; at an epoch boundary it is accepted, since the
    next epoch is well defined either way: the returned text says what changed,
    for the caller to log when it loads the state.
    """
    if saved.kind != current["kind"]:
        raise IncompatibleStateError(
            f"the checkpoint's DataLoader read a {saved.kind} dataset, this one reads a {current['kind']} dataset; "
            "restore it into a loader over the same dataset"
        )
    changed = _changed(saved, current)
    if not changed:
        return None
    what = ", ".join(f"{key} was {old!r} and is now {new!r}" for key, (old, new) in changed.items())
    if saved.mid_epoch:
        fix = " and ".join(f"{key}={old!r}" for key, (old, _) in changed.items())
        raise IncompatibleStateError(
            f"savegame.DataLoader: the checkpoint stopped after batch {saved.position} of epoch {saved.epoch}, "
            f"but {what}, so the rest of that epoch cannot be reproduced. Build the loader with {fix} to resume "
            "exactly, or resume from a checkpoint taken at an epoch boundary, where such changes are accepted."
        )
    return (f"savegame.DataLoader: {what} since the checkpoint; accepted at an epoch boundary (epoch "
            f"{saved.epoch} starts afresh with the new settings)")


def _changed(saved: Saved, current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The settings that differ; for iterable datasets, the number of worker slots (num_workers 0 is 1 slot)."""
    changed = {key: (old, current[key]) for key, old in saved.settings.items()
               if key != "num_workers" and old != current[key]}
    if saved.kind == "iterable":
        old, new = saved.settings["num_workers"], current["num_workers"]
        if slot_count("iterable", old) != slot_count("iterable", new):
            changed["num_workers"] = (old, new)
    return changed


def _int(state: Mapping[str, Any], key: str, least: int | None = 0, *, none: bool = False) -> Any:
    value = state[key]
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (least is not None and value < least):
        bound = "" if least is None else f" >= {least}"
        raise IncompatibleStateError(f"DataLoader state field {key!r} must be an int{bound}"
                                     f"{' or None' if none else ''}, got {value!r}; {_DAMAGED}")
    return value


def _item_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise IncompatibleStateError(f"DataLoader state field {key!r} holds {value!r}, not an int >= 0; {_DAMAGED}")
    return value


def _bool(state: Mapping[str, Any], key: str) -> bool:
    value = state[key]
    if not isinstance(value, bool):
        raise IncompatibleStateError(f"DataLoader state field {key!r} must be a bool, got {value!r}; {_DAMAGED}")
    return value


def _list(state: Mapping[str, Any], key: str) -> list[Any]:
    value = state.get(key)
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise IncompatibleStateError(f"DataLoader state field {key!r} must be a list, got {value!r}; {_DAMAGED}")
    return list(value)


def _generator_state(value: Any) -> torch.Tensor:
    """A sampler generator's saved state as a tensor that ``torch.Generator.set_state`` accepts."""
    try:
        tensor = torch.as_tensor(value, dtype=torch.uint8).clone()
        torch.Generator().set_state(tensor)         # a scratch generator: refuse now, change nothing
    except (TypeError, ValueError, RuntimeError) as exc:
        raise IncompatibleStateError(f"DataLoader state field 'generators' holds a value that is not a torch "
                                     f"generator state ({exc}); {_DAMAGED}") from exc
    return tensor
