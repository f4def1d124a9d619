"""Run bookkeeping around each save: best tracking, early stopping, lineage, retention, history, aliases.

The decisions are the pure functions of :mod:`savegame.policies`; this module feeds
them the records of the run directory and carries out their answers.

A save goes through three stages here:
- ``propose`` computes what the save would store (best and early-stopping state)
  without changing anything; a save that fails before it is accepted leaves no trace;
- ``accept`` makes that state current in memory once the save is accepted (its values
  encoded, its name chosen), so ``should_stop`` answers at once;
- ``committed`` runs in the writer after the commit: the state becomes durable, and
  aliases, retention and history follow, each on its own so that one failing never
  stops the others. The aliases are rewritten before retention deletes anything, and
  name only checkpoints it keeps, so no crash leaves an alias naming a deleted
  checkpoint. A save that fails in the background calls ``rollback``: the in-memory
  state returns to the last durable one before the error is raised.

The records come from :class:`RunDir`, which keeps them in memory across saves: a
save's bookkeeping reads no manifest but its own and does not list the directory.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from savegame import policies
from savegame.errors import ConfigurationError, StorageError
from savegame.run import settings as run_settings
from savegame.run.directory import CheckpointInfo, RunDir, parse_step
from savegame.run.history import History
from savegame.run.lineage import move_aside
from savegame.run.settings import RunSettings

log = logging.getLogger("savegame.run")


@dataclass(frozen=True)
class Pending:
    """One save as the tracker sees it, from ``propose`` to ``committed``."""

    info: CheckpointInfo
    run_state: dict[str, Any]
    improved: dict[str, bool]
    abandon: list[str] = field(default_factory=list)
    scope: tuple[policies.CheckpointRecord, ...] | None = None  # the records its decisions need (None: all)


class RunTracker:
    def __init__(self, run: RunDir, *, keep_last: int | None, keep_every: int | None, modes: Mapping[str, str],
                 best_k: int, early_stopping: policies.EarlyStopping | None) -> None:
        """Arguments are validated by :class:`savegame.options.Options`."""
        self.run, self.history = run, History(run.storage)
        self.modes, self.best_k, self.early_stopping = dict(modes), best_k, early_stopping
        self.retention: list[policies.Policy] = []
        if keep_last is not None:
            self.retention.append(policies.keep_last(keep_last))
        if keep_every is not None:
            self.retention.append(policies.keep_every(keep_every))
        if self.retention:
            self.retention += [policies.keep_best(m, mode, best_k) for m, mode in self.modes.items()]
        self.resumed_from: str | None = None
        self._resume: policies.CheckpointRecord | None = None  # set until the line is settled by a save
        self._durable_es = early_stopping.state_dict() if early_stopping is not None else None
        self._settings: RunSettings | None = RunSettings(keep_last, keep_every, self.modes, best_k)  # until written
        self._keep_last = keep_last
        self._window: policies.Window | None = None  # None: the next save looks at every record

    @property
    def should_stop(self) -> bool:
        return self.early_stopping is not None and self.early_stopping.should_stop

    # -- one save ---------------------------------------------------------------------------
    def ahead(self) -> list[str]:
        """Checkpoints the next save abandons (past the one this run resumed from), oldest first."""
        if self._resume is None:
            return []
        resumed = self._resume
        names = policies.ahead_of(self.run.records(), resumed)
        damaged = [n for n in self.run.unreadable() if (parse_step(n) or 0) > resumed.step]
        return names + damaged

    def propose(self, info: CheckpointInfo, abandon: list[str]) -> Pending:
        """What saving ``info`` stores (its best state and commit sequence); changes nothing."""
        info = dataclasses.replace(info, seq=self.run.next_seq())
        scope = None
        if self._window is not None and not abandon:
            protected = [self.resumed_from] if self.resumed_from else []
            scope = policies.scope(self._window, info.record(), self.run.saves_of, self.run.records_of,
                                   protected=protected)
        if scope is not None:
            records = scope
        else:
            records = [*(r for r in self.run.records() if r.name not in abandon), info.record()]
        best = policies.best_from_records(records, self.modes, self.best_k)
        improved = {m: any(s == info.step for _, s in held["entries"]) for m, held in best.items()}
        es = self.early_stopping
        es_state = None
        if es is not None:
            es_state = es.state_dict()
            if es.metric in info.metrics:
                new = policies.early_stopping_step(es_state, info.metrics[es.metric], info.step, es.config)
                es_state = {**new, "config": es.config.to_dict()}
        return Pending(dataclasses.replace(info, best=best), {"best": best, "early_stopping": es_state},
                       improved, abandon, tuple(scope) if scope is not None else None)

    def accept(self, pending: Pending) -> None:
        """The save is accepted: its early-stopping state is current from now on."""
        if self.early_stopping is not None and pending.run_state["early_stopping"] is not None:
            self.early_stopping.load_state_dict(pending.run_state["early_stopping"])

    def rollback(self) -> None:
        """The accepted save failed: back to the last durable state."""
        if self.early_stopping is not None and self._durable_es is not None:
            self.early_stopping.load_state_dict(self._durable_es)

    def settle_line(self, pending: Pending) -> None:
        """Before the write: move the abandoned continuation aside (raises StorageError)."""
        resumed = self._resume
        if resumed is not None:
            self._window = None
            move_aside(self.run, self.history, resumed.name, resumed.step, pending.abandon)
            self._resume = None

    def committed(self, pending: Pending) -> None:
        """In the writer, after a successful commit: durable state, logs, aliases, retention, history.

        The checkpoint is already durable, so a storage error here is logged, not raised;
        each step runs even if another failed. The aliases go first (they name only what
        retention keeps); if they could not be written (a full disk), they are tried
        again once retention has freed space.
        """
        info = pending.info
        self.run.remember(info)
        was_stopped = bool(self._durable_es and self._durable_es["stopped"])
        self._durable_es = pending.run_state["early_stopping"]
        for metric, better in pending.improved.items():
            if better:
                log.info("new best %s=%s at step %d (%s)", metric, info.metrics[metric], info.step, info.name)
        if self._durable_es is not None and self._durable_es["stopped"] and not was_stopped and self.early_stopping:
            es = self.early_stopping
            log.warning("early stopping: %s has not improved for %d evaluations", es.metric, es.patience)
        records = list(pending.scope) if pending.scope is not None else self.run.records()
        aliases_written = _logged("the aliases", info.name, lambda i: self._write_aliases(records), info)
        _logged("the retention settings file", info.name, self._write_settings, info)
        _logged("retention", info.name, lambda i: self._retain(i, records), info)
        _logged("the metrics history", info.name, self._append_history, info)
        if not aliases_written:
            _logged("the aliases", info.name, lambda i: self._write_aliases(self.run.records()), info)

    # -- restore ----------------------------------------------------------------------------
    def resumed(self, info: CheckpointInfo | None, run_state: Any) -> None:
        """Take back the early-stopping state of the checkpoint a run resumed from.

        ``info`` is None for a checkpoint outside this run directory. Best tracking is
        not taken from the checkpoint: it is the ranking of this run's checkpoints.
        """
        self.resumed_from = info.name if info is not None else None
        self._resume = info.record() if info is not None else None
        self._window = None
        es = self.early_stopping
        saved = run_state.get("early_stopping") if isinstance(run_state, Mapping) else None
        if es is not None and isinstance(saved, Mapping):
            es.load_state_dict(saved)
            self._durable_es = es.state_dict()

    def best_names(self, which: str) -> list[str]:
        """Candidates for "best" / "best:<metric>", best first (see :func:`policies.rank_best`)."""
        metric, mode = self._best_metric(which)
        current = policies.latest_saves(self.run.records())
        return [r.name for r in policies.rank_best(current, metric, mode)]

    def _best_metric(self, which: str) -> tuple[str, str]:
        """The metric and mode ``which`` asks for: from best= first, else from the best state stored in the
        run, else from early_stopping= (its metric and direction)."""
        metric = which.partition(":")[2] if ":" in which else None
        stored = [i.best for i in sorted(self.run.infos(), key=lambda i: i.step, reverse=True) if i.best]
        es = self.early_stopping
        if metric is None:
            metric = next(iter(self.modes), None) or next((m for s in stored for m in s), None) or \
                (es.metric if es is not None else None)
            if metric is None:
                raise ConfigurationError(
                    f"restore('best'): no metric is tracked in {self.run.storage.root!r}; pass "
                    "best={'val_loss': 'min'} (your metric and 'min' or 'max') to the Checkpointer, or "
                    "restore('best:<metric>')")
        mode = self.modes.get(metric) or next(
            (s[metric]["mode"] for s in stored if isinstance(s.get(metric), Mapping)
             and s[metric].get("mode") in policies.MODES), None) or \
            (es.mode if es is not None and es.metric == metric else None)
        if mode is None:
            raise ConfigurationError(
                f"restore({which!r}): metric {metric!r} is not tracked: best= of this Checkpointer does not name it "
                f"and no checkpoint in {self.run.storage.root!r} recorded whether it is minimised or maximised; "
                f"pass best={{{metric!r}: 'min'}} or best={{{metric!r}: 'max'}} to the Checkpointer")
        return metric, mode

    # -- after a commit ---------------------------------------------------------------------
    def _retain(self, info: CheckpointInfo, records: list[policies.CheckpointRecord]) -> None:
        """Delete what the policies do not keep, deciding over ``records`` (the save's scope, or all)."""
        protected = {info.name} | ({self.resumed_from} if self.resumed_from else set())
        plan = policies.plan_retention(records, self.retention, protected=protected)
        level = logging.INFO if plan.delete else logging.DEBUG
        if log.isEnabledFor(level):
            kept = "; ".join(f"{name} ({', '.join(why)})" for name, why in plan.keep.items())
            log.log(level, "retention keeps %s", kept)
        self._window = None  # until every deletion is done: a failed one is retried over all records
        for name, why in plan.delete.items():
            log.info("retention: deleting checkpoint %s: %s", name, why)
            self.run.delete(name)
        self._window = policies.next_window(records, plan, modes=self.modes, best_k=self.best_k,
                                            keep_last=self._keep_last)

    def _append_history(self, info: CheckpointInfo) -> None:
        self.history.append(info.step, info.epoch, info.metrics, info.time)

    def _write_aliases(self, records: list[policies.CheckpointRecord]) -> None:
        self.run.write_aliases(policies.alias_targets(records, self.modes), self.modes, only_stale=True)

    def _write_settings(self, info: CheckpointInfo) -> None:
        """Once per process: the retention settings, so ``savegame prune`` keeps what this run keeps."""
        if self._settings is not None:
            run_settings.write(self.run.storage, self._settings)
            self._settings = None


def _logged(what: str, name: str, task: Callable[[CheckpointInfo], None], info: CheckpointInfo) -> bool:
    """Run ``task``; a storage error is logged, not raised. True when it succeeded."""
    try:
        task(info)
    except StorageError as exc:
        log.warning("checkpoint %s is saved, but %s could not be updated: %s", name, what, exc)
        return False
    return True


def sized(pending: Pending, nbytes: int) -> Pending:
    """``pending`` with the byte count its write ended up with."""
    return replace(pending, info=replace(pending.info, bytes=nbytes))
