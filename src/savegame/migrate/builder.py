"""Building a :class:`~.result.ForeignCheckpoint`: the bookkeeping every importer shares.

An importer walks the foreign checkpoint and tells a :class:`Draft` where each
piece goes; every foreign key ends up either in ``mapped`` (with where it went)
or in ``left_out``, so the user sees exactly what was and was not carried over.
The importer then finishes the draft at the import's step (the file's own, or
the one the user chose): best values and early stopping the tool recorded without
a step, and history lines placed by epoch, take that step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from savegame.engine.keys import canonical_state
from savegame.errors import ConfigurationError, CorruptCheckpointError
from savegame.migrate import rng_convert
from savegame.migrate.result import ForeignCheckpoint
from savegame.migrate.values import as_count, as_float, not_weights, plain_json


@dataclass
class Draft:
    """An import in progress: what went where, and what was left out."""

    state: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    best: dict[str, tuple[str, list[tuple[float, int | None]]]] = field(default_factory=dict)
    early_stopping: dict[str, Any] | None = None
    bad_epochs: int | None = None  # a bare "epochs without improvement" count, resolved in finish()
    step: int | None = None
    epoch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    mapped: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    history: list[tuple[int | None, int | None, dict[str, float]]] = field(default_factory=list)  # step, epoch
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def map(self, source: str, target: str) -> None:
        self.mapped.append(f"{source} -> {target}")

    def leave_out(self, source: str, why: str = "") -> None:
        self.left_out.append(f"{source} ({why})" if why else source)

    def model(self, source: str, value: Any, name: str = "model") -> None:
        """A model state dict, stored under canonical keys (no _orig_mod., no common module.)."""
        problem = not_weights(value)
        if problem is not None:
            raise CorruptCheckpointError(f"{source} is not a model state dict (str -> tensor): it is {problem}")
        self._put(name, canonical_state(value), source)

    def obj(self, source: str, value: Any, name: str) -> None:
        """The state dict of an optimizer, scheduler, scaler, ...; None means the tool saved none."""
        if value is None:
            self.leave_out(source, "None")
            return
        if not isinstance(value, Mapping):
            raise CorruptCheckpointError(f"{source} is a {type(value).__name__}, not a state dict")
        self._put(name, dict(value), source)

    def numbered(self, source: str, values: Any, base: str) -> None:
        """A list of state dicts -> base, base_1, base_2, ..."""
        if not isinstance(values, (list, tuple)):
            raise CorruptCheckpointError(f"{source} is a {type(values).__name__}, not a list of state dicts")
        for i, value in enumerate(values):
            self.obj(f"{source}[{i}]", value, base if i == 0 else f"{base}_{i}")

    def _put(self, name: str, value: dict[str, Any], source: str) -> None:
        if name in self.state:
            raise CorruptCheckpointError(f"{source} would replace state.{name}, which was already imported")
        self.state[name] = value
        self.map(source, f"state.{name}")

    def config(self, source: str, value: Any) -> None:
        """A config snapshot the tool saved -> ``extra[source]`` when it is plain JSON values, else left out."""
        try:
            self.extra[source] = plain_json(value, source)
        except (TypeError, ValueError) as why:
            self.leave_out(source, f"a config snapshot, but {why}: extra holds plain JSON values only")
            return
        self.map(source, f"extra[{source!r}]")

    def rename(self, names: Mapping[str, str]) -> None:
        """Give imported states other names (``{"optimizer_1": "disc_optimizer"}``), in place."""
        unknown = [old for old in names if old not in self.state]
        if unknown:
            raise ConfigurationError(f"cannot rename {', '.join(map(repr, unknown))}: the import has no such state "
                                     f"(it imports {', '.join(self.state) or 'none'})")
        final = [names.get(name, name) for name in self.state]
        clash = sorted({name for name in final if final.count(name) > 1})
        if clash:
            raise ConfigurationError(f"renaming would give two imported states the name {clash[0]!r}; "
                                     f"the import's states are {', '.join(self.state)}")
        self.state = {names.get(k, k): v for k, v in self.state.items()}
        moved = {f"state.{old}": f"state.{new}" for old, new in names.items()}
        self.mapped = [f"{src} -> {moved[dst]} (renamed from {dst})" if dst in moved else line
                       for line in self.mapped for src, _, dst in [line.partition(" -> ")]]

    def put_rng(self, kind: str, source: str, value: Any) -> None:
        convert = {"python": rng_convert.python_state, "numpy": rng_convert.numpy_state,
                   "torch": rng_convert.torch_state, "cuda": rng_convert.cuda_states}[kind]
        try:
            self.rng[kind] = convert(value, source)
        except rng_convert.Untracked as why:
            self.leave_out(source, str(why))
            return
        self.map(source, f"rng.{kind}")

    def set_step(self, source: str, value: Any) -> None:
        self.step = as_count(value, source)
        self.map(source, "step")

    def set_epoch(self, source: str, value: Any) -> None:
        if isinstance(value, float) and math.isfinite(value) and value >= 0:
            value = math.floor(value)  # tools that count fractional epochs (HF Trainer)
        self.epoch = as_count(value, source)
        self.map(source, "epoch")

    def metric(self, source: str, value: Any, name: str) -> None:
        number = as_float(value)
        if number is None:
            self.leave_out(source, "not a number")
            return
        self.metrics[name] = number
        self.map(source, f"metrics.{name}")

    def best_value(self, source: str, value: Any, metric: str, mode: str, step: int | None = None) -> None:
        """One best value of ``metric``; ``step`` None means "the import's step" (tools rarely record it)."""
        self.best_entries(source, [(value, step)], metric, mode)

    def best_entries(self, source: str, entries: Sequence[tuple[Any, int | None]], metric: str, mode: str) -> None:
        kept = [(v, s) for v, s in ((as_float(v), s) for v, s in entries) if v is not None and math.isfinite(v)]
        if not kept:
            self.leave_out(source, "no finite best value")
            return
        self.best[metric] = (mode, kept)
        self.map(source, f"run.best.{metric}")

    def add_history(self, step: int | None, epoch: int | None, metrics: Mapping[str, Any]) -> None:
        """One line of the metrics history; ``step`` None: placed by ``epoch`` when the draft is finished."""
        numbers = {str(k): v for k, v in ((k, as_float(v)) for k, v in metrics.items()) if v is not None}
        if numbers:
            self.history.append((step, epoch, numbers))

    def finish(self, layout: str, *, step: int | None = None, step_from_epoch: bool = False) -> ForeignCheckpoint:
        """The ForeignCheckpoint at ``step`` (None: the file's own).

        ``step_from_epoch``: a tool that counts epochs only uses the epoch as its step.
        """
        if self.step is None and step_from_epoch and self.epoch is not None:
            self.step = self.epoch
            self.map("epoch", "step (the tool counts epochs only)")
        own = 0 if self.step is None else self.step
        if step is not None and step != own:
            self.map(f"step {own} (the file's)", f"step {step} (chosen for the import)")
        final = own if step is None else step
        best = {m: {"mode": mode, "entries": _ranked(entries, mode, final)} for m, (mode, entries) in self.best.items()}
        stopping = self.early_stopping
        if self.bad_epochs is not None and stopping is None:
            stopping = _from_count(self.bad_epochs, best)
        if stopping is not None:  # the file's count includes the evaluation at its own step
            known = stopping["best_step"] is not None or stopping["best"] is None
            stopping = {**stopping, "best_step": stopping["best_step"] if known else final, "last_step": final}
        if best:
            self.notes.append(_best_note(best))
        tree = {"state": self.state, "rng": self.rng, "run": {"best": best, "early_stopping": stopping}}
        return ForeignCheckpoint(layout=layout, tree=tree, step=final, epoch=self.epoch, metrics=dict(self.metrics),
                                 mapped=list(self.mapped), left_out=list(self.left_out),
                                 history=self._history(final), notes=list(self.notes), extra=dict(self.extra))

    def _history(self, final: int) -> list[dict[str, Any]]:
        """History lines, oldest first. A line known by epoch only ends that epoch's share of the steps
        (epoch e of a run at epoch E, step S: step round((e + 1) * S / (E + 1)))."""
        lines = []
        for step, epoch, metrics in self.history:
            if step is None:
                step = epoch if self.epoch is None or epoch is None else round((epoch + 1) * final / (self.epoch + 1))
            lines.append({"step": step, "epoch": epoch, "metrics": metrics})
        return sorted(lines, key=lambda line: line["step"] or 0)


def early_stopping_state(metric: str, mode: str, *, best: float | None, best_step: int | None, bad_epochs: int,
                         patience: int | None = None, stopped: bool = False) -> dict[str, Any]:
    """The shape ``savegame.EarlyStopping.state_dict()`` has, plus ``metric``/``mode`` at the top.

    ``config.patience`` is the foreign tool's patience when it recorded one, else
    None; the EarlyStopping the run resumes with decides its own patience anyway.
    """
    return {"metric": metric, "mode": mode, "best": best, "best_step": best_step, "bad_epochs": bad_epochs,
            "smoothed": None, "stopped": stopped, "last_step": None,
            "config": {"metric": metric, "mode": mode, "patience": patience, "min_delta": 0.0, "smoothing": None}}


def _best_note(best: Mapping[str, Any]) -> str:
    values = ", ".join(f"{m}={held['entries'][0][0]:.6g} at step {held['entries'][0][1]}" for m, held in best.items())
    return (f"the file records best {values}. savegame ranks best among the run's checkpoints by their metrics, "
            "so a best reached at another step counts only if that checkpoint is in the run: migrate the tool's "
            "best checkpoint file too (savegame migrate BEST_FILE --to RUN_DIR --step N).")


def _from_count(count: int, best: Mapping[str, Any]) -> dict[str, Any]:
    """Early stopping from a bare count: it tracks pck when a best pck exists, else val_loss (seed 001's rule)."""
    metric = "pck" if "pck" in best else "val_loss"
    mode = "max" if metric == "pck" else "min"
    held = best.get(metric, {}).get("entries") or [[None, None]]
    return early_stopping_state(metric, mode, best=held[0][0], best_step=held[0][1], bad_epochs=count)


def _ranked(entries: list[tuple[float, int | None]], mode: str, step: int) -> list[list[Any]]:
    filled = [(v, step if s is None else s) for v, s in entries]
    filled.sort(key=lambda e: (e[0] if mode == "min" else -e[0], -e[1]))
    return [[v, s] for v, s in filled]


Rule = Callable[[Draft, str, Any], None]


def apply_rules(draft: Draft, checkpoint: Mapping[Any, Any], rules: Mapping[str, Rule]) -> None:
    """Send each top-level key through its rule; keys without one are left out."""
    for key, value in checkpoint.items():
        rule = rules.get(key) if isinstance(key, str) else None
        if rule is None:
            draft.leave_out(str(key))
        else:
            rule(draft, str(key), value)


def marker(draft: Draft, source: str, value: Any) -> None:
    """A key that only identifies the layout (format_version, a tool's version string)."""
    draft.map(source, f"(layout marker {value!r})")
