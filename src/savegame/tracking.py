"""Run bookkeeping around each save: best tracking, early stopping, aliases, history, retention.

The decisions are the pure functions of :mod:`savegame.policies`; this module
feeds them records read from the run directory and carries out their answers.
Best and early-stopping state travel inside every checkpoint (tree["run"]) and
are restored with it, so a resumed run never forgets its best or its patience.
Retention runs only after a commit succeeded, and never deletes the newest
checkpoint or the one the run resumed from.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from savegame import policies
from savegame.errors import ConfigurationError, StorageError
from savegame.format import names as n
from savegame.run_dir import CheckpointInfo, RunDir

log = logging.getLogger("savegame.run")


class RunTracker:
    def __init__(self, run: RunDir, *, keep_last: int | None, keep_every: int | None,
                 best: Mapping[str, str] | Sequence[str] | str | None, best_k: int,
                 early_stopping: policies.EarlyStopping | None) -> None:
        for arg, value in (("keep_last", keep_last), ("keep_every", keep_every)):
            if value is not None and (type(value) is not int or value < 1):
                raise ConfigurationError(f"{arg} must be a positive int or None, got {value!r}")
        if type(best_k) is not int or best_k < 1:
            raise ConfigurationError(f"best_k must be a positive int, got {best_k!r}")
        if early_stopping is not None and not isinstance(early_stopping, policies.EarlyStopping):
            raise ConfigurationError("early_stopping must be a savegame.EarlyStopping or None")
        self.run = run
        self.modes = policies.parse_best_spec(best)
        self.best_k, self.early_stopping = best_k, early_stopping
        self.best_state: dict[str, Any] = {}
        self.resumed_from: str | None = None
        self.retention: list[policies.Policy] = []
        if keep_last is not None:
            self.retention.append(policies.keep_last(keep_last))
        if keep_every is not None:
            self.retention.append(policies.keep_every(keep_every))
        if self.retention:
            self.retention += [policies.keep_best(m, mode, best_k) for m, mode in self.modes.items()]
            self.retention.append(policies.keep_pinned())

    @property
    def should_stop(self) -> bool:
        return self.early_stopping is not None and self.early_stopping.should_stop

    def observe(self, step: int, metrics: Mapping[str, float]) -> dict[str, Any]:
        """Fold a new save's metrics into the tracked state; return the state stored with it."""
        self.best_state, improved = policies.update_best(self.best_state, metrics, step, self.modes, self.best_k)
        for metric, better in improved.items():
            if better:
                log.info("new best %s=%s at step %d", metric, metrics[metric], step)
        es = self.early_stopping
        if es is not None and es.metric in metrics:
            if es.update(metrics[es.metric], step):
                log.warning("early stopping: %s has not improved for %d evaluations", es.metric, es.patience)
        return {"best": self.best_state, "early_stopping": es.state_dict() if es is not None else None}

    def resumed(self, name: str | None, run_state: Any) -> None:
        """Take back the tracked state of the checkpoint a run resumed from."""
        self.resumed_from = name
        if not isinstance(run_state, Mapping):
            return
        if isinstance(run_state.get("best"), Mapping):
            self.best_state = dict(run_state["best"])
        if self.early_stopping is not None and isinstance(run_state.get("early_stopping"), Mapping):
            self.early_stopping.load_state_dict(run_state["early_stopping"])

    def after_commit(self, info: CheckpointInfo) -> None:
        """Runs in the writer after a successful commit: history, aliases, retention.

        The checkpoint is already durable, so a storage error here is logged, not
        raised: aliases are hints and retention retries after the next save.
        """
        name = info.name
        self.run.remember(info)
        try:
            self._append_history(info.step, info.epoch, info.metrics)
            self.run.write_alias("latest", name)
            infos = self.run.infos()
            for alias, target in self._best_targets(infos).items():
                self.run.write_alias(alias, target)
            self._retain(infos, keep=name)
        except StorageError as exc:
            log.warning("checkpoint %s is saved, but bookkeeping after it failed: %s", name, exc)

    def ordered_names(self) -> list[str]:
        """Checkpoint names oldest first (ties in step: the later save last)."""
        return self.run.names()

    def best_names(self, which: str) -> list[str]:
        """Candidates for "best" / "best:<metric>", best first; the alias file is only a hint."""
        metric = which.split(":", 1)[1] if ":" in which else next(iter(self.modes), None)
        if metric is None:
            raise ConfigurationError("restore('best') needs Checkpointer(best={...}) or restore('best:<metric>')")
        mode = self.modes.get(metric, "min")
        ranked = _rank(self.run.infos(), metric, mode)
        hint = self.run.read_alias(f"best:{metric}")
        if hint in ranked[:1]:
            log.debug("alias best:%s -> %s confirmed", metric, hint)
        return ranked

    def _best_targets(self, infos: list[CheckpointInfo]) -> dict[str, str]:
        out = {}
        for i, (metric, mode) in enumerate(self.modes.items()):
            ranked = _rank(infos, metric, mode)
            if ranked:
                out[f"best:{metric}"] = ranked[0]
                if i == 0:
                    out["best"] = ranked[0]
        return out

    def _retain(self, infos: list[CheckpointInfo], keep: str) -> None:
        duplicates = _superseded(infos)
        if not self.retention and not duplicates:
            return
        records = [policies.CheckpointRecord(step=i.step, name=i.name, time=i.time, epoch=i.epoch,
                                             metrics=i.metrics, pinned=i.pinned) for i in infos]
        protected = {keep} | ({self.resumed_from} if self.resumed_from else set())
        doomed = policies.to_delete(records, self.retention, protected=protected) if self.retention else []
        for name in sorted(set(doomed) | (duplicates - protected)):
            log.info("retention: deleting checkpoint %s", name)
            self.run.delete(name)

    def _append_history(self, step: int, epoch: int | None, metrics: Mapping[str, float]) -> None:
        line = {"step": step, "epoch": epoch, "time": time.time(),
                "metrics": {k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}}
        self.run.storage.append(n.HISTORY_FILE, (json.dumps(line) + "\n").encode())


def _rank(infos: list[CheckpointInfo], metric: str, mode: str) -> list[str]:
    scored = [(i.metrics[metric], -i.step, i.name) for i in infos
              if metric in i.metrics and math.isfinite(i.metrics[metric])]
    scored.sort(key=lambda s: (s[0] if mode == "min" else -s[0], -s[1]))
    return [name for _, _, name in scored]


def _superseded(infos: list[CheckpointInfo]) -> set[str]:
    """Older checkpoints of a step that was saved again (the newer save replaces them)."""
    newest: dict[int, CheckpointInfo] = {}
    out = set()
    for info in infos:
        current = newest.get(info.step)
        if current is None or (info.time, info.name) > (current.time, current.name):
            if current is not None:
                out.add(current.name)
            newest[info.step] = info
        else:
            out.add(info.name)
    return out

