"""MultiLoader: several loaders mixed by weight, round robin or in sequence, resumable exactly."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from savegame.data import seeding
from savegame.data.userstate import is_stateful
from savegame.errors import ConfigurationError, IncompatibleStateError, SavegameError

log = logging.getLogger("savegame.data")

MODES = ("weighted", "round_robin", "sequential")
EXHAUSTION = ("stop", "cycle", "drop")
_VERSION = 1
_EXHAUSTED = object()


class MultiLoader:
    """Iterates several named loaders as one stream of ``(name, batch)``.

    ``mode`` picks the next loader: ``"weighted"`` draws it with probabilities
    proportional to ``weights`` from the MultiLoader's own generator (seeded by
    ``seed``; never a global one), ``"round_robin"`` takes them in turn in the
    mapping's order, ``"sequential"`` exhausts each in order.

    ``exhaustion`` says what happens when a loader runs out (weighted and round robin):
    ``"stop"`` ends the MultiLoader's epoch; ``"cycle"`` starts that loader's next
    epoch at once, and the MultiLoader's epoch ends when every loader has run out at
    least once; ``"drop"`` leaves it out until every loader has run out. Sequential
    mode takes only ``"stop"``: its epoch ends after the last loader.

    Each loader is a stream: a loader cut off by the end of a MultiLoader epoch
    continues where it was in the next one. Each ``iter()`` starts the next epoch,
    except the first one after restoring a mid-epoch state, which continues it.

    ``state_dict()`` holds the position, the choice generator and every loader's
    ``state_dict()``; after ``load_state_dict`` the stream continues exactly. Loaders
    must have ``state_dict()``/``load_state_dict()`` (use savegame.DataLoader).
    """

    def __init__(self, loaders: Mapping[str, Any], *, weights: Mapping[str, float] | None = None,
                 mode: str = "weighted", exhaustion: str = "stop", seed: int | None = None) -> None:
        self._loaders = _check_loaders(loaders)
        self._names = list(self._loaders)
        if mode not in MODES:
            raise ConfigurationError(f"mode must be one of {MODES}, got {mode!r}")
        if exhaustion not in EXHAUSTION:
            raise ConfigurationError(f"exhaustion must be one of {EXHAUSTION}, got {exhaustion!r}")
        if mode == "sequential" and exhaustion != "stop":
            raise ConfigurationError("mode='sequential' runs each loader to its end; it takes only exhaustion='stop'")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigurationError(f"seed must be an int or None, got {seed!r}")
        self._weights = _check_weights(weights, self._names, mode)
        self._mode, self._exhaustion = mode, exhaustion
        self._seed = seed if seed is not None else seeding.draw_seed()
        self._rng = np.random.Generator(np.random.PCG64(seeding.derive(self._seed, 0)))
        self._iters: dict[str, Iterator[Any] | None] = dict.fromkeys(self._names)
        self._epoch, self._in_progress, self._position, self._cursor = 0, False, 0, 0
        self._dropped: set[str] = set()
        self._ran_out: set[str] = set()
        self._resume_pending = False
        self._generation = 0

    @property
    def epoch(self) -> int:
        """The epoch in progress, or the next one ``iter()`` will start."""
        return self._epoch

    @property
    def loaders(self) -> dict[str, Any]:
        return dict(self._loaders)

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        if self._resume_pending:
            self._resume_pending = False
        else:
            if self._in_progress:
                self._epoch += 1
            self._in_progress, self._position, self._cursor = True, 0, 0
            self._dropped, self._ran_out = set(), set()
        self._generation += 1
        return self._run(self._generation)

    def _run(self, generation: int) -> Iterator[tuple[str, Any]]:
        while True:
            if generation != self._generation:
                raise SavegameError("this MultiLoader iterator was superseded by a newer iter() or "
                                    "load_state_dict(); only the newest iterator may be advanced")
            item = self._next_item()
            if item is None:
                self._epoch += 1
                self._in_progress, self._position, self._cursor = False, 0, 0
                return
            self._position += 1
            yield item

    def _next_item(self) -> tuple[str, Any] | None:
        """The next (name, batch), or None at the end of the epoch."""
        while True:
            name = self._choose()
            if name is None:
                return None
            batch = self._pull(name)
            if batch is not _EXHAUSTED:
                return name, batch
            if self._mode == "sequential":
                self._cursor += 1
            elif self._exhaustion == "stop":
                return None
            elif self._exhaustion == "drop":
                self._dropped.add(name)
            else:
                self._ran_out.add(name)
                if self._ran_out.issuperset(self._names):
                    return None
                batch = self._pull(name)
                if batch is not _EXHAUSTED:
                    return name, batch
                log.warning("MultiLoader: loader %r yields no batches at all; it is left out of epoch %d",
                            name, self._epoch)
                self._dropped.add(name)

    def _choose(self) -> str | None:
        live = [n for n in self._names if n not in self._dropped]
        if not live:
            return None
        if self._mode == "sequential":
            return self._names[self._cursor] if self._cursor < len(self._names) else None
        if self._mode == "round_robin":
            while self._names[self._cursor % len(self._names)] in self._dropped:
                self._cursor += 1
            name = self._names[self._cursor % len(self._names)]
            self._cursor = (self._cursor + 1) % len(self._names)
            return name
        weights = [self._weights[n] for n in live]
        point = float(self._rng.random()) * math.fsum(weights)
        total = 0.0
        for name, weight in zip(live, weights):
            total += weight
            if point < total:
                return name
        return live[-1]

    def _pull(self, name: str) -> Any:
        iterator = self._iters[name]
        if iterator is None:
            iterator = self._iters[name] = iter(self._loaders[name])
        try:
            return next(iterator)
        except StopIteration:
            self._iters[name] = None
            return _EXHAUSTED

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The MultiLoader's position and choice generator, and every loader's state."""
        return {
            "version": _VERSION, "mode": self._mode, "exhaustion": self._exhaustion, "names": list(self._names),
            "weights": dict(self._weights), "seed": self._seed, "epoch": self._epoch,
            "in_progress": self._in_progress, "position": self._position, "cursor": self._cursor,
            "dropped": sorted(self._dropped), "ran_out": sorted(self._ran_out),
            "rng": self._rng.bit_generator.state,
            "loaders": {name: loader.state_dict() for name, loader in self._loaders.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``; raises IncompatibleStateError if the loaders or, mid-epoch, the mode differ.

        All or nothing: every field and every loader's state is checked first
        (those of savegame.DataLoaders fully), and if a loader still refuses its
        state, the loaders loaded before it get their previous states back, so the
        MultiLoader and its iterator go on as before.
        """
        _check_state(state, self._names, self._mode, self._exhaustion)
        for name, loader in self._loaders.items():
            precheck = getattr(loader, "_check_state", None)
            if callable(precheck):
                precheck(state["loaders"][name])
        if dict(state["weights"]) != self._weights:
            log.warning("MultiLoader: weights were %s and are now %s; later choices use the new weights",
                        dict(state["weights"]), self._weights)
        self._load_loaders(state["loaders"])
        self._seed = state["seed"]
        self._rng.bit_generator.state = state["rng"]
        self._epoch, self._in_progress = state["epoch"], state["in_progress"]
        self._position, self._cursor = state["position"], state["cursor"]
        self._dropped, self._ran_out = set(state["dropped"]), set(state["ran_out"])
        self._iters = dict.fromkeys(self._names)
        self._resume_pending = self._in_progress
        self._generation += 1

    def _load_loaders(self, states: Mapping[str, Any]) -> None:
        loaded: list[tuple[str, Any]] = []
        try:
            for name, loader in self._loaders.items():
                before = loader.state_dict()
                loader.load_state_dict(states[name])
                loaded.append((name, before))
        except BaseException:
            for name, before in reversed(loaded):
                self._loaders[name].load_state_dict(before)
                self._iters[name] = None        # the next pull continues it from where it was
            raise


def _check_loaders(loaders: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(loaders, Mapping) or not loaders:
        raise ConfigurationError("loaders must be a non-empty mapping of names to loaders")
    for name, loader in loaders.items():
        if not isinstance(name, str):
            raise ConfigurationError(f"loader names must be str, got {name!r}")
        if not hasattr(loader, "__iter__"):
            raise ConfigurationError(f"loaders[{name!r}] ({type(loader).__name__}) is not iterable")
        if not is_stateful(loader):
            raise ConfigurationError(
                f"loaders[{name!r}] ({type(loader).__name__}) has no state_dict()/load_state_dict(), so the "
                "MultiLoader could not resume it; use savegame.DataLoader instead of torch.utils.data.DataLoader"
            )
    return dict(loaders)


def _check_weights(weights: Mapping[str, float] | None, names: list[str], mode: str) -> dict[str, float]:
    if weights is None:
        return dict.fromkeys(names, 1.0)
    if mode != "weighted":
        raise ConfigurationError(f"weights are used only with mode='weighted', not mode={mode!r}")
    if not isinstance(weights, Mapping) or set(weights) != set(names):
        raise ConfigurationError(f"weights must map every loader name {names} to a number, got {weights!r}")
    out = {}
    for name in names:
        value = weights[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigurationError(f"weights[{name!r}] must be a finite number > 0, got {value!r}")
        out[name] = float(value)
    return out


def _check_state(state: Any, names: list[str], mode: str, exhaustion: str) -> None:
    keys = ("version", "mode", "exhaustion", "names", "weights", "seed", "epoch", "in_progress", "position",
            "cursor", "dropped", "ran_out", "rng", "loaders")
    if not isinstance(state, Mapping) or any(k not in state for k in keys):
        raise IncompatibleStateError("the state was not saved by a savegame.MultiLoader")
    if state["version"] != _VERSION:
        raise IncompatibleStateError(f"MultiLoader state version {state['version']!r} is not supported")
    if list(state["names"]) != names:
        raise IncompatibleStateError(
            f"the checkpoint's MultiLoader had loaders {list(state['names'])}, this one has {names}; "
            "build it with the same names in the same order"
        )
    _check_fields(state, names)
    if state["in_progress"] and (state["mode"], state["exhaustion"]) != (mode, exhaustion):
        raise IncompatibleStateError(
            f"the checkpoint stopped mid-epoch with mode={state['mode']!r}, exhaustion={state['exhaustion']!r}; "
            f"this MultiLoader has mode={mode!r}, exhaustion={exhaustion!r}. Use the saved settings to resume, "
            "or resume from a checkpoint taken at an epoch boundary"
        )


def _check_fields(state: Mapping[str, Any], names: list[str]) -> None:
    """Refuse, naming the field, a value of the wrong type: nothing is loaded from a malformed state."""
    damaged = "the checkpoint is damaged or was not written by savegame.MultiLoader"
    for key in ("seed", "epoch", "position", "cursor"):
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, int) or (key != "seed" and value < 0):
            raise IncompatibleStateError(f"MultiLoader state field {key!r} holds {value!r}, not an int; {damaged}")
    if not isinstance(state["in_progress"], bool):
        raise IncompatibleStateError(f"MultiLoader state field 'in_progress' holds {state['in_progress']!r}, "
                                     f"not a bool; {damaged}")
    for key in ("dropped", "ran_out"):
        if not isinstance(state[key], (list, tuple)) or not set(state[key]) <= set(names):
            raise IncompatibleStateError(f"MultiLoader state field {key!r} holds {state[key]!r}, not a list of "
                                         f"loader names; {damaged}")
    if not isinstance(state["weights"], Mapping) or not isinstance(state["loaders"], Mapping) \
            or set(state["loaders"]) != set(names):
        raise IncompatibleStateError(f"MultiLoader state fields 'weights' and 'loaders' must map the loader "
                                     f"names; {damaged}")
    try:
        np.random.PCG64().state = state["rng"]       # a scratch generator: refuse now, change nothing
    except (TypeError, ValueError, KeyError) as exc:
        raise IncompatibleStateError(f"MultiLoader state field 'rng' is not a PCG64 state ({exc}); {damaged}") from exc
