"""Early stopping: stop when a metric has not improved for ``patience`` evaluations."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

from savegame.errors import ConfigurationError, IncompatibleStateError
from savegame.policies._common import check_count, check_min_delta, check_mode, finite
from savegame.policies.best import is_better


class EarlyStoppingState(TypedDict):
    best: float | None
    best_step: int | None
    bad_epochs: int
    smoothed: float | None
    stopped: bool
    last_step: int | None


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
        check_mode(self.mode)
        check_count(self.patience, "patience")
        check_min_delta(self.min_delta)
        s = self.smoothing
        if s is not None and (not isinstance(s, numbers.Real) or not 0 <= float(s) < 1):
            raise ConfigurationError(f"smoothing must be None or a number with 0 <= smoothing < 1, got {s!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "patience": self.patience,
                "min_delta": self.min_delta, "smoothing": self.smoothing}


def initial_early_stopping_state() -> EarlyStoppingState:
    return {"best": None, "best_step": None, "bad_epochs": 0, "smoothed": None, "stopped": False, "last_step": None}


def early_stopping_step(state: Mapping[str, Any], value: float | None, step: int,
                        config: EarlyStoppingConfig) -> EarlyStoppingState:
    """One evaluation: the new state after ``value`` was observed at ``step``.

    The compared value is the exponential moving average ``smoothing*prev + (1-smoothing)*value``
    (the value itself without smoothing). It improves when it beats the best by more than
    ``min_delta``; that resets ``bad_epochs`` to 0, anything else (NaN/inf/None included,
    which also leave the average untouched) adds one. ``stopped`` is exactly
    ``bad_epochs >= patience``: training stops after ``patience`` consecutive non-improvements.
    An evaluation at the step counted last (a step saved again) changes nothing: each
    step counts once.
    """
    if step == state.get("last_step"):
        return _copy(state)
    v, prev = finite(value), state["smoothed"]
    s = config.smoothing or 0.0
    smoothed = prev if v is None else (v if prev is None else s * prev + (1 - s) * v)
    if v is not None and is_better(smoothed, state["best"], config.mode, config.min_delta):
        best, best_step, bad = smoothed, step, 0
    else:
        best, best_step, bad = state["best"], state["best_step"], int(state["bad_epochs"]) + 1
    return {"best": best, "best_step": best_step, "bad_epochs": bad, "smoothed": smoothed,
            "stopped": bad >= config.patience, "last_step": step}


def _copy(state: Mapping[str, Any]) -> EarlyStoppingState:
    return {"best": state["best"], "best_step": state["best_step"], "bad_epochs": state["bad_epochs"],
            "smoothed": state["smoothed"], "stopped": state["stopped"], "last_step": state.get("last_step")}


def _loaded_state(state: Mapping[str, Any], patience: int) -> EarlyStoppingState:
    try:
        best, smoothed = state["best"], state["smoothed"]
        best_step, bad = state["best_step"], state["bad_epochs"]
        last = state.get("last_step")  # absent in states written before it existed
        ok = all(x is None or isinstance(x, numbers.Real) for x in (best, smoothed))
        ok = ok and all(x is None or (isinstance(x, int) and not isinstance(x, bool)) for x in (best_step, last))
        ok = ok and isinstance(bad, int) and bad >= 0
    except KeyError as exc:
        raise IncompatibleStateError(f"early-stopping state lacks {exc}: {dict(state)!r}") from exc
    if not ok:
        raise IncompatibleStateError(f"early-stopping state is malformed: {dict(state)!r}")
    return {"best": None if best is None else float(best), "best_step": best_step, "bad_epochs": bad,
            "smoothed": None if smoothed is None else float(smoothed), "stopped": bad >= patience,
            "last_step": last}


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
        """Observe ``value`` at ``step``; return True when training should stop.

        A second update at the step updated last is ignored (each step counts once)."""
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
