"""Retention, best tracking and lineage through the real Checkpointer, driven by hypothesis.

Random sequences of saves (with metrics, NaN, ties and pins), re-saves of a step and
resumes from any surviving checkpoint run against a real run directory. After every
save the directory must hold exactly what an independent, brute-force model says:
the newest save, the one resumed from, every pinned save, and every current save that
keep_last / keep_every / best-k keeps (all current saves without a policy); the best
state stored in the new checkpoint and the best alias must name the brute-force best;
an abandoned continuation must be moved aside, never deleted.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import savegame

LOSSES = [0.1, 0.5, 0.5, 0.9, math.nan]


@dataclass
class Save:
    name: str
    step: int
    order: int
    loss: float | None
    pinned: bool


@dataclass
class Model:
    keep_last: int | None
    keep_every: int | None
    mode: str | None
    best_k: int
    alive: list[Save] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)
    resumed: Save | None = None
    line_pending: bool = False

    def current(self) -> list[Save]:
        newest: dict[int, Save] = {}
        for s in self.alive:
            if s.step not in newest or s.order > newest[s.step].order:
                newest[s.step] = s
        return sorted(newest.values(), key=lambda s: (s.step, s.order))

    def ranked(self) -> list[Save]:
        scored = [s for s in self.current() if s.loss is not None and math.isfinite(s.loss)]
        sign = 1 if self.mode == "min" else -1
        return sorted(scored, key=lambda s: (sign * s.loss, s.step))  # type: ignore[operator]

    def saved(self, new: Save) -> None:
        if self.line_pending and self.resumed is not None:
            r = self.resumed
            ahead = [s for s in self.alive if s is not r and (s.step, s.order) > (r.step, r.order)]
            self.moved += [s.name for s in ahead]
            self.alive = [s for s in self.alive if s not in ahead]
        self.line_pending = False
        self.alive.append(new)
        current = self.current()
        keep = {new.name} | {s.name for s in self.alive if s.pinned}
        if self.resumed is not None:
            keep.add(self.resumed.name)
        policies = self.keep_last is not None or self.keep_every is not None
        if not policies:
            keep |= {s.name for s in current}
        if self.keep_last is not None:
            keep |= {s.name for s in current[-self.keep_last:]}
        if self.keep_every is not None:
            keep |= {s.name for s in current if s.step % self.keep_every == 0}
        if policies and self.mode is not None:
            keep |= {s.name for s in self.ranked()[: self.best_k]}
        older_kept = {s.step for s in self.alive if s.name in keep and s not in current}
        keep |= {s.name for s in current if s.step in older_kept}  # a step never falls back to an older save
        self.alive = [s for s in self.alive if s.name in keep]


operations = st.lists(st.one_of(
    st.tuples(st.just("save"), st.sampled_from(LOSSES + [None]), st.booleans()),
    st.tuples(st.just("resave"), st.sampled_from(LOSSES), st.booleans()),
    st.tuples(st.just("resume"), st.integers(0, 50), st.just(False)),
), min_size=1, max_size=14)


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@example(None, 2, "max", 1, [("save", 0.5, False), ("resume", 0, False), ("resave", 0.1, False), ("save", 0.5, False)])
@given(st.sampled_from([None, 1, 2, 3]), st.sampled_from([None, 2, 3]), st.sampled_from([None, "min", "max"]),
       st.integers(1, 2), operations)
def test_retention_best_and_lineage_through_the_checkpointer(keep_last, keep_every, mode, best_k, ops):
    model = Model(keep_last, keep_every, mode, best_k)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        net = torch.nn.Linear(1, 1)
        ckpt = savegame.Checkpointer(run, {"m": net}, async_save=False, keep_last=keep_last, keep_every=keep_every,
                                     best={"loss": mode} if mode else None, best_k=best_k)
        step, order = 0, 0
        try:
            for kind, arg, pin in ops:
                if kind == "resume":
                    if not model.alive:
                        continue
                    target = sorted(model.alive, key=lambda s: s.order)[arg % len(model.alive)]
                    info = ckpt.restore(os.path.join(run, target.name))
                    assert info is not None and info.step == target.step
                    model.resumed, model.line_pending, step = target, True, target.step
                    continue
                if kind == "save" or step == 0:
                    step += 1
                order += 1
                metrics = {} if arg is None else {"loss": arg}
                path = ckpt.save(step, metrics=metrics, pin=pin)
                new = Save(os.path.basename(path), step, order, arg, pin)
                model.saved(new)
                check(run, model, new, mode, best_k)
        finally:
            ckpt.close()


def check(run: Path, model: Model, new: Save, mode: str | None, best_k: int) -> None:
    on_disk = sorted(p.name for p in run.iterdir() if p.name.startswith("step-"))
    assert on_disk == sorted(s.name for s in model.alive)
    aside = {p.name for p in run.glob("abandoned/*/step-*")}
    assert set(model.moved) <= aside  # moved, never deleted
    stored = savegame.load(run / new.name)["run"]["best"]
    if mode is None:
        assert stored == {}
        return
    expected = [[s.loss, s.step] for s in model.ranked()[:best_k]]
    assert stored == {"loss": {"mode": mode, "entries": expected}}
    alias = run / "best.alias.json"
    if expected:
        assert json.loads(alias.read_text())["target"] == model.ranked()[0].name
