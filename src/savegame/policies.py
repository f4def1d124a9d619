"""Pure decisions over checkpoint records: retention, best-k tracking, early stopping.

Nothing here touches storage, clocks or loggers. Every function takes plain values
and returns new ones without mutating its arguments, so the Checkpointer may call
them from any thread and the tests drive them with hypothesis. All state is
JSON-able: ``json.loads(json.dumps(state))`` is an equivalent state.

Ordering conventions shared by every function:
- "newest" is the highest ``(step, time, name)``; "oldest first" sorts by the same key.
- "best" ranks finite values only (NaN, inf, None and missing never rank); among equal
  values the earlier step wins.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

from savegame.errors import ConfigurationError, IncompatibleStateError

MODES = ("min", "max")


@dataclass(frozen=True)
class CheckpointRecord:
    """What the policies know about one committed checkpoint; ``name`` identifies it."""

    step: int
    name: str
    time: float
    epoch: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    pinned: bool = False


Policy = Callable[[Sequence[CheckpointRecord]], set[str]]
"""A retention policy: the records of a run -> the names it wants kept."""
RetentionPolicy = Policy


# --- shared helpers -------------------------------------------------------------------

def _check_mode(mode: object, arg: str = "mode") -> str:
    if not isinstance(mode, str) or mode not in MODES:
        raise ConfigurationError(f"{arg} must be 'min' or 'max', got {mode!r}")
    return mode


def _check_count(value: object, arg: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{arg} must be a positive int, got {value!r}")
    return value


def _check_min_delta(value: object) -> float:
    if not isinstance(value, numbers.Real) or not 0 <= float(value) < math.inf:
        raise ConfigurationError(f"min_delta must be a finite number >= 0, got {value!r}")
    return float(value)


def _finite(value: object) -> float | None:
    """The value as a float when it is a finite real number, else None (never ranks)."""
    if isinstance(value, numbers.Real):
        result = float(value)
        return result if math.isfinite(result) else None
    return None


def _recency(record: CheckpointRecord) -> tuple[int, float, str]:
    return (record.step, record.time, record.name)


def _rank_key(value: float, step: int, mode: str) -> tuple[float, int]:
    """Sort key: best first, and the earlier step first among equal values."""
    return (value if mode == "min" else -value, step)


def _named(policy: Policy, label: str) -> Policy:
    policy.__name__ = policy.__qualname__ = label
    return policy


# --- retention ------------------------------------------------------------------------

def keep_last(n: int) -> Policy:
    """Keep exactly the ``min(n, len(records))`` newest records."""
    n = _check_count(n, "keep_last(n)")

    def policy(records: Sequence[CheckpointRecord]) -> set[str]:
        return {r.name for r in sorted(records, key=_recency)[-n:]}

    return _named(policy, f"keep_last({n})")


def keep_every(n: int) -> Policy:
    """Keep every record whose step is a multiple of ``n`` (step 0 included), forever."""
    n = _check_count(n, "keep_every(n)")

    def policy(records: Sequence[CheckpointRecord]) -> set[str]:
        return {r.name for r in records if r.step % n == 0}

    return _named(policy, f"keep_every({n})")


def keep_best(metric: str, mode: str, k: int = 1) -> Policy:
    """Keep the ``k`` records with the best finite ``metric``; ties go to the earlier step.

    Records without the metric, or with NaN/inf, are never kept by this policy.
    """
    mode, k = _check_mode(mode), _check_count(k, "keep_best(k)")

    def policy(records: Sequence[CheckpointRecord]) -> set[str]:
        scored = [(v, r) for r in records if (v := _finite(r.metrics.get(metric))) is not None]
        scored.sort(key=lambda s: (_rank_key(s[0], s[1].step, mode), _recency(s[1])))
        return {r.name for _, r in scored[:k]}

    return _named(policy, f"keep_best({metric!r}, {mode!r}, {k})")


def keep_pinned() -> Policy:
    """Keep every record saved with ``pin=True``."""

    def policy(records: Sequence[CheckpointRecord]) -> set[str]:
        return {r.name for r in records if r.pinned}

    return _named(policy, "keep_pinned()")


def select_keep(records: Iterable[CheckpointRecord], policies: Iterable[Policy], *,
                protected: Collection[str] = ()) -> set[str]:
    """Names of the records to keep: those any policy keeps, the protected ones and the newest.

    Guarantees: the newest record and every protected record present are kept; nothing
    else is kept unless a policy asked for it; without policies everything is kept. The
    answer is a subset of the records' names and does not depend on their order.
    """
    if isinstance(protected, str):
        raise ConfigurationError(f"protected must be a collection of names, not the string {protected!r}")
    rows, chosen = list(records), list(policies)
    names = {r.name for r in rows}
    if not chosen or not rows:
        return names
    keep = set(protected)
    for policy in chosen:
        keep |= policy(rows)
    keep.add(max(rows, key=_recency).name)
    return keep & names


def to_delete(records: Iterable[CheckpointRecord], policies: Iterable[Policy], *,
              protected: Collection[str] = ()) -> list[str]:
    """The complement of :func:`select_keep`, oldest first (the order to delete them in)."""
    rows = sorted(records, key=_recency)
    keep = select_keep(rows, policies, protected=protected)
    return [r.name for r in rows if r.name not in keep]


# --- best-k tracking ------------------------------------------------------------------

def is_better(value: float | None, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """True when ``value`` beats ``best`` by more than ``min_delta`` in direction ``mode``.

    A None, NaN or infinite value is never better; any finite value beats a best of None or NaN.
    """
    mode, min_delta = _check_mode(mode), _check_min_delta(min_delta)
    v = _finite(value)
    if v is None:
        return False
    if best is None or math.isnan(best):
        return True
    return v < best - min_delta if mode == "min" else v > best + min_delta


def _held_entries(state: Mapping[str, Any], metric: str, mode: str) -> list[tuple[float, int]]:
    """The entries held for ``metric``, best first; none when they were ranked under another mode."""
    held = state.get(metric)
    if held is None:
        return []
    try:
        if held["mode"] != mode:
            return []  # a ranking under the old mode says nothing under the new one
        entries = [(float(v), int(s)) for v, s in held["entries"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise IncompatibleStateError(
            f"best-tracking state for {metric!r} is malformed: {held!r}; expected "
            "{'mode': 'min'|'max', 'entries': [[value, step], ...]}") from exc
    return sorted(entries, key=lambda e: _rank_key(e[0], e[1], mode))


def update_best(state: Mapping[str, Any], metrics: Mapping[str, float | None], step: int,
                modes: Mapping[str, str], k: int = 1) -> tuple[dict[str, Any], dict[str, bool]]:
    """Fold one evaluation into the best-k state; return the new state and, per metric of ``modes``, whether it improved.

    A metric improves only when its value is finite and strictly better than the k-th entry
    (or fewer than k entries are held). ``state`` is never mutated; metrics it holds that
    ``modes`` does not name are carried over unchanged. An entry of the same ``step`` is
    replaced (a step saved again supersedes its old checkpoint). Entries ranked under a
    different mode than ``modes`` asks for are dropped.
    """
    k = _check_count(k, "best_k")
    new: dict[str, Any] = {m: copy.deepcopy(held) for m, held in state.items() if m not in modes}
    improved: dict[str, bool] = {}
    for metric, mode in modes.items():
        mode = _check_mode(mode, f"mode of {metric!r}")
        entries = [e for e in _held_entries(state, metric, mode) if e[1] != step][:k]
        value = _finite(metrics.get(metric))
        better = value is not None and (len(entries) < k or is_better(value, entries[-1][0], mode))
        if better and value is not None:
            entries = sorted([*entries, (value, step)], key=lambda e: _rank_key(e[0], e[1], mode))[:k]
        new[metric] = {"mode": mode, "entries": [[v, s] for v, s in entries]}
        improved[metric] = better
    return new, improved


# --- early stopping -------------------------------------------------------------------

class EarlyStoppingState(TypedDict):
    best: float | None
    best_step: int | None
    bad_epochs: int
    smoothed: float | None
    stopped: bool


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """Validated early-stopping settings; a bad one raises ConfigurationError naming it."""

    metric: str
    mode: str
    patience: int
    min_delta: float = 0.0
    smoothing: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise ConfigurationError(f"metric must be a non-empty string, got {self.metric!r}")
        _check_mode(self.mode)
        _check_count(self.patience, "patience")
        _check_min_delta(self.min_delta)
        s = self.smoothing
        if s is not None and (not isinstance(s, numbers.Real) or not 0 <= float(s) < 1):
            raise ConfigurationError(f"smoothing must be None or a number with 0 <= smoothing < 1, got {s!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "patience": self.patience,
                "min_delta": self.min_delta, "smoothing": self.smoothing}


def initial_early_stopping_state() -> EarlyStoppingState:
    return {"best": None, "best_step": None, "bad_epochs": 0, "smoothed": None, "stopped": False}


def early_stopping_step(state: Mapping[str, Any], value: float | None, step: int,
                        config: EarlyStoppingConfig) -> EarlyStoppingState:
    """One evaluation: the new state after ``value`` was observed at ``step``.

    The compared value is the exponential moving average ``smoothing*prev + (1-smoothing)*value``
    (the value itself without smoothing). It improves when it beats the best by more than
    ``min_delta``; that resets ``bad_epochs`` to 0, anything else (NaN/inf/None included,
    which also leave the average untouched) adds one. ``stopped`` is exactly
    ``bad_epochs >= patience``: training stops after ``patience`` consecutive non-improvements.
    """
    v, prev = _finite(value), state["smoothed"]
    s = config.smoothing or 0.0
    smoothed = prev if v is None else (v if prev is None else s * prev + (1 - s) * v)
    if v is not None and is_better(smoothed, state["best"], config.mode, config.min_delta):
        best, best_step, bad = smoothed, step, 0
    else:
        best, best_step, bad = state["best"], state["best_step"], int(state["bad_epochs"]) + 1
    return {"best": best, "best_step": best_step, "bad_epochs": bad, "smoothed": smoothed,
            "stopped": bad >= config.patience}


def _loaded_state(state: Mapping[str, Any], patience: int) -> EarlyStoppingState:
    try:
        best, smoothed = state["best"], state["smoothed"]
        best_step, bad = state["best_step"], state["bad_epochs"]
        ok = all(x is None or isinstance(x, numbers.Real) for x in (best, smoothed))
        ok = ok and (best_step is None or isinstance(best_step, int)) and isinstance(bad, int) and bad >= 0
    except KeyError as exc:
        raise IncompatibleStateError(f"early-stopping state lacks {exc}: {dict(state)!r}") from exc
    if not ok:
        raise IncompatibleStateError(f"early-stopping state is malformed: {dict(state)!r}")
    return {"best": None if best is None else float(best), "best_step": best_step, "bad_epochs": bad,
            "smoothed": None if smoothed is None else float(smoothed), "stopped": bad >= patience}


class EarlyStopping:
    """Stop training when ``metric`` has not improved for ``patience`` consecutive updates.

    An update improves when the (optionally smoothed) value beats the best so far by more
    than ``min_delta``; NaN and inf never improve. The state travels in every checkpoint:
    after ``load_state_dict`` the count continues exactly where it was, so a resumed run
    decides exactly as an uninterrupted one would.
    """

    def __init__(self, metric: str, *, mode: str = "min", patience: int, min_delta: float = 0.0,
                 smoothing: float | None = None) -> None:
        self._config = EarlyStoppingConfig(metric, mode, patience, min_delta, smoothing)
        self._state = initial_early_stopping_state()

    @property
    def config(self) -> EarlyStoppingConfig:
        return self._config

    @property
    def metric(self) -> str:
        return self._config.metric

    @property
    def mode(self) -> str:
        return self._config.mode

    @property
    def patience(self) -> int:
        return self._config.patience

    @property
    def min_delta(self) -> float:
        return self._config.min_delta

    @property
    def smoothing(self) -> float | None:
        return self._config.smoothing

    @property
    def should_stop(self) -> bool:
        """True when the last ``patience`` updates all failed to improve."""
        return self._state["stopped"]

    def update(self, value: float | None, step: int) -> bool:
        """Observe ``value`` at ``step``; return True when training should stop."""
        if value is not None and not isinstance(value, numbers.Real):
            raise ConfigurationError(f"value must be a real number or None (use tensor.item()), got {type(value).__name__}")
        self._state = early_stopping_step(self._state, value, step, self._config)
        return self._state["stopped"]

    def state_dict(self) -> dict[str, Any]:
        """A fresh JSON-able copy of the state, with the config it was produced under."""
        return {**self._state, "config": self._config.to_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``. A different metric or mode raises IncompatibleStateError;
        this object's patience, min_delta and smoothing apply from now on."""
        saved = state.get("config") if isinstance(state, Mapping) else None
        if not isinstance(saved, Mapping):
            raise IncompatibleStateError(f"early-stopping state has no config: {state!r}")
        for key in ("metric", "mode"):
            if saved.get(key) != getattr(self._config, key):
                raise IncompatibleStateError(
                    f"early-stopping state was tracked with {key}={saved.get(key)!r}, but this "
                    f"EarlyStopping has {key}={getattr(self._config, key)!r}; use the same {key} to resume")
        self._state = _loaded_state(state, self._config.patience)

    def __repr__(self) -> str:
        c = self._config
        return (f"EarlyStopping({c.metric!r}, mode={c.mode!r}, patience={c.patience}, "
                f"min_delta={c.min_delta}, smoothing={c.smoothing})")


# --- configuration --------------------------------------------------------------------

def _split_spec(item: object) -> tuple[object, object]:
    if not isinstance(item, str):
        raise ConfigurationError(f"best must name metrics as strings, got {item!r}")
    metric, sep, mode = item.rpartition(":")
    return (metric, mode) if sep else (item, "min")


def parse_best_spec(best: Mapping[str, str] | Sequence[str] | str | None) -> dict[str, str]:
    """Normalise ``best=`` to ``{metric: mode}`` in the given order (the first is "best").

    Accepts None (nothing tracked), ``{"val_loss": "min", "pck": "max"}``, a name
    (``"val_loss"`` is minimised, ``"pck:max"`` names its mode) or a sequence of names.
    Raises ConfigurationError for a mode other than "min"/"max", an empty or non-string
    name, or one metric given two modes.
    """
    if best is None:
        return {}
    if isinstance(best, Mapping):
        pairs: list[tuple[object, object]] = [(metric, mode) for metric, mode in best.items()]
    elif isinstance(best, str):
        pairs = [_split_spec(best)]
    elif isinstance(best, Sequence):
        pairs = [_split_spec(item) for item in best]
    else:
        raise ConfigurationError(f"best must be a mapping, a sequence of names, a name or None, got {type(best).__name__}")
    out: dict[str, str] = {}
    for metric, mode in pairs:
        if not isinstance(metric, str) or not metric:
            raise ConfigurationError(f"best: metric names must be non-empty strings, got {metric!r}")
        mode = _check_mode(mode, f"best[{metric!r}]")
        if out.setdefault(metric, mode) != mode:
            raise ConfigurationError(f"best: metric {metric!r} is given both modes 'min' and 'max'")
    return out
