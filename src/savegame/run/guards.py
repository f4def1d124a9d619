"""Refusals of the mistakes a training script makes every week, which would otherwise become a wrong run.

Each guard raises one :class:`ConfigurationError` that says what is wrong and what to
do; the Checkpointer calls them before anything is written, so a refused save leaves the
run directory as it was.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import TypeVar

from savegame.errors import ConfigurationError
from savegame.policies import EarlyStopping

T = TypeVar("T")


def monitored(modes: Mapping[str, str], early_stopping: EarlyStopping | None) -> dict[str, str]:
    """Every metric the run watches, with who watches it (for the error message)."""
    out = {metric: f"best={{{metric!r}: {mode!r}}}" for metric, mode in modes.items()}
    if early_stopping is not None:
        out.setdefault(early_stopping.metric, f"EarlyStopping({early_stopping.metric!r})")
    return out


def check_monitored(metrics: Mapping[str, float], watched: Mapping[str, str]) -> None:
    """A save with metrics must give every watched one; a save without metrics (mid-epoch) is fine.

    Without this, a misspelt metric (``best={"val_los": "min"}``) is never ranked and
    early stopping never fires, silently.
    """
    if not metrics:
        return
    missing = [m for m in watched if m not in metrics]
    if not missing:
        return
    metric = missing[0]
    close = difflib.get_close_matches(metric, list(metrics), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigurationError(
        f"save(metrics=...) lacks {metric!r}{hint}, which {watched[metric]} watches; the metrics given are "
        f"{sorted(metrics)}. Pass {metric!r} in metrics=, or fix the name in best= / EarlyStopping(...) "
        "(saves without metrics, such as mid-epoch ones, need none)")


def check_new_run(existing: Sequence[str], run_dir: str) -> None:
    """The first save of a Checkpointer that did not restore must not join another run's checkpoints
    (``run_dir`` as shown to users: an absolute path or a URL)."""
    if not existing:
        return
    shown = ", ".join(existing[-3:]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
    raise ConfigurationError(
        f"{run_dir} already holds the checkpoints of a run ({shown}), and this Checkpointer "
        "has not restored it: saving would mix two runs (retention, 'latest' and 'best' would mix them up). "
        "Call restore() first to continue that run, use another run directory, or pass fresh=True to the "
        "Checkpointer to move those checkpoints aside (into abandoned/, nothing is deleted) and start a new run")


def check_step(step: int, resumed: tuple[int, str] | None) -> None:
    """After restoring step N of this run, a save of a step below N means the step counter was not restored."""
    if resumed is None or step >= resumed[0]:
        return
    floor, name = resumed
    raise ConfigurationError(
        f"save({step}): this run was restored from step {floor} ({name}), and a step below it would make "
        f"older checkpoints look newer (retention would delete the wrong ones, 'latest' would stay at {floor}). "
        "Continue the step counter from the restore (step = info.step), or, to start over, use another run "
        "directory or Checkpointer(..., fresh=True)")


def only_objects(objects: Mapping[str, T], only: object) -> dict[str, T]:
    """``restore(only=[...])``: the registered objects to restore; every name must be registered."""
    if only is None:
        return dict(objects)
    if isinstance(only, (str, bytes)) or not isinstance(only, Sequence) or not only \
            or not all(isinstance(name, str) for name in only):
        raise ConfigurationError(f"only must be a non-empty list of state names such as ['model'], got {only!r}")
    unknown = [name for name in only if name not in objects]
    if unknown:
        raise ConfigurationError(f"only={list(only)!r}: {unknown} not in this Checkpointer's state; "
                                 f"its states are {sorted(objects)}")
    return {name: objects[name] for name in only}
