"""Verbs over a run directory: ``ls``, ``verify``, ``prune``."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import click
from rich.text import Text

from savegame import policies
from savegame.cli._app import FINDING, CliError
from savegame.cli._output import (
    console,
    echo_json,
    human_age,
    human_bytes,
    metrics_text,
    new_table,
    number,
)
from savegame.cli._overview import print_abandoned, print_child_runs
from savegame.cli._paths import RUN_DIR, CheckpointArg, checkpoint_bytes, is_checkpoint_dir, require_run_dir
from savegame.cli._progress import ByteProgress
from savegame.engine import reader
from savegame.errors import CorruptCheckpointError, RunLockedError, StorageError
from savegame.run import settings as run_settings
from savegame.run import store
from savegame.run.directory import RunDir, info_from_manifest, parse_step
from savegame.run.lease import writer_lock
from savegame.run.listing import checkpoint_path
from savegame.run.settings import RunSettings
from savegame.storage.base import Storage
from savegame.storage.counting import CountingStorage
from savegame.storage.urls import is_url, join, open_storage, split_url


@dataclass
class Row:
    """One checkpoint of a run as listed: what its manifest says, or why it cannot be read."""

    name: str
    path: str
    step: int
    epoch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    time: float | None = None
    bytes: int = 0
    pinned: bool = False
    aliases: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seq: int | None = None
    best: Mapping[str, Any] | None = None
    own: int = 0  # bytes only this checkpoint uses (its directory, and pack entries no other one references)
    shared: int = 0  # bytes of pack entries other checkpoints use too

    def record(self) -> policies.CheckpointRecord:
        when = self.time if self.time is not None else _mtime(self.path)
        return policies.CheckpointRecord(step=self.step, name=self.name, time=when, epoch=self.epoch,
                                         metrics=self.metrics, pinned=self.pinned, seq=self.seq)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "step": self.step, "epoch": self.epoch,
                "metrics": self.metrics, "time": self.time, "bytes": self.bytes, "pinned": self.pinned,
                "aliases": self.aliases, "damaged": bool(self.problems), "problems": self.problems,
                "own_bytes": self.own, "shared_bytes": self.shared}


def scan(run_dir: str, *, full: bool = False, progress: Callable[[int], None] | None = None) -> list[Row]:
    """Every checkpoint of ``run_dir``, oldest first, damaged ones included (with their problems).

    Without ``full`` only the manifest and the tensor file headers are checked (cheap:
    catches missing files, truncation and a damaged manifest); ``full`` checks every byte,
    reporting the bytes read to ``progress``. A checkpoint that disappears while it is
    read (a trainer's retention deleted it) is gone, not damaged: it is left out.
    ``aliases`` are derived from the manifests (see :func:`label_aliases`).
    """
    storage = open_storage(run_dir)
    reading = storage if progress is None else CountingStorage(storage, on_read=progress)  # checkpoints' bytes only
    rows, docs = [], {}
    for name in RunDir(storage).names():
        path = join(run_dir, name)
        row = Row(name, path, parse_step(name) or 0, bytes=checkpoint_bytes(storage, name))
        try:
            doc = docs[name] = reader.read_manifest(reading, name)
            info = info_from_manifest(f"{storage.root}/{name}", name, doc)
            row.epoch, row.metrics, row.time, row.pinned = info.epoch, dict(info.metrics), info.time, info.pinned
            row.seq, row.best = info.seq, info.best
            row.problems = reader.verify_checkpoint(reading, name) if full else reader.quick_check(reading, name, doc)
        except CorruptCheckpointError as exc:
            row.problems = [str(exc)]
        if row.problems and not storage.exists(name):
            continue
        rows.append(row)
    shares = store.usage({row.name: docs[row.name] for row in rows if row.name in docs})
    for row in rows:
        own, shared = shares.get(row.name, (0, 0))
        row.own, row.shared = row.bytes + own, shared
        row.bytes = row.own + row.shared
    label_aliases(rows, RunDir(storage), run_settings.read(storage))
    return rows


def run_modes(rows: list[Row], run: RunDir, settings: RunSettings | None) -> dict[str, str]:
    """``{metric: mode}`` of the run's best tracking, the first being "best": from the retention settings
    file, then the best alias files, then the best state stored in the newest checkpoint that has one."""
    modes = dict(settings.best) if settings is not None else {}
    about = [run.alias_about(alias) for alias in ("best", *sorted(run.aliases()))]
    for doc in about:
        metric, mode = doc.get("metric"), doc.get("mode")
        if isinstance(metric, str) and metric and mode in policies.MODES:
            modes.setdefault(metric, mode)
    for row in sorted((r for r in rows if r.best and not r.problems), key=lambda r: r.record().step, reverse=True):
        for metric, held in (row.best or {}).items():
            modes.setdefault(metric, held["mode"])
        break
    return modes


def label_aliases(rows: list[Row], run: RunDir, settings: RunSettings | None) -> dict[str, str]:
    """Set each row's aliases; return the run's modes (see :func:`run_modes`).

    ``latest``, ``best`` and ``best:<metric>`` are derived from the intact checkpoints'
    manifests, as the library derives them (alias files are hints that a crash can leave
    stale); any other alias file is shown where its target exists.
    """
    modes = run_modes(rows, run, settings)
    intact = [row.record() for row in rows if not row.problems]
    by_name = {row.name: row for row in rows}
    derived = {alias: record.name for alias, record in policies.alias_targets(intact, modes).items()}
    other = {alias: target for alias, target in run.aliases().items()
             if alias != "latest" and alias != "best" and not alias.startswith("best:")}
    for alias, target in sorted({**other, **derived}.items()):
        if target in by_name:
            by_name[target].aliases.append(alias)
    return modes


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0


# -- ls ------------------------------------------------------------------------------------

@click.command("ls")
@click.argument("run_dir", type=RUN_DIR)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list (oldest first) instead of a table.")
@click.option("--verify", "full", is_flag=True, help="Check every byte, not only manifests and headers.")
def ls(run_dir: str, as_json: bool, full: bool) -> None:
    """List the checkpoints of RUN_DIR, oldest first; damaged ones are marked, not hidden.

    With --verify, exits 1 when a checkpoint is damaged.
    """
    require_run_dir(run_dir)
    if full:
        with ByteProgress() as bar:
            storage = open_storage(run_dir)
            bar.phase("verifying", sum(checkpoint_bytes(storage, name) for name in RunDir(storage).names()))
            rows = scan(run_dir, full=True, progress=bar.advance)
    else:
        rows = scan(run_dir)
    if as_json:
        echo_json([row.to_json() for row in rows])
    else:
        _print_rows(run_dir, rows)
    if full and any(row.problems for row in rows):
        click.get_current_context().exit(FINDING)


def _print_rows(run_dir: str, rows: list[Row]) -> None:
    out = console()
    if not rows:
        if is_url(run_dir) or not print_child_runs(out, run_dir):
            out.print(f"no checkpoints in {run_dir}")
        if not is_url(run_dir):
            print_abandoned(out, run_dir)
        return
    shared = any(row.shared for row in rows)  # incremental checkpoints: what each one alone holds, and shares
    columns = ("size", "own", "shared") if shared else ("size",)
    table = new_table(f"{run_dir}: {len(rows)} checkpoint(s)", "checkpoint", "step", "epoch", "metrics", *columns,
                      "age", "aliases", "status", right=("step", "epoch", *columns, "age"))
    for row in rows:
        status = Text("DAMAGED", style="bold red") if row.problems else Text("pinned" if row.pinned else "")
        sizes = (human_bytes(row.bytes), human_bytes(row.own), human_bytes(row.shared))[:len(columns)]
        table.add_row(row.name, str(row.step), number(row.epoch) if row.epoch is not None else "",
                      metrics_text(row.metrics), *sizes, human_age(row.time), ", ".join(row.aliases), status)
    out.print(table)
    for row in rows:
        for problem in row.problems:
            out.print(Text(f"damaged {row.name}: {problem}", style="red"))
    if not is_url(run_dir):
        print_abandoned(out, run_dir)


# -- verify --------------------------------------------------------------------------------

@click.command("verify")
@click.argument("path", type=CheckpointArg(file_okay=False))
def verify(path: str) -> None:
    """Check every byte of PATH (a run directory: all its checkpoints; or one checkpoint directory).

    Exits 0 when everything is intact, 1 when a checkpoint is damaged.
    """
    path = checkpoint_path(path)  # RUN_DIR@best and the like: that one checkpoint
    storage: Storage
    if is_checkpoint_dir(path):
        parent, name = split_url(path) if is_url(path) else os.path.split(os.path.abspath(path))
        storage, names = open_storage(parent), [name]
    else:
        storage = open_storage(path)
        names = RunDir(storage).names()
        if not names:
            raise CliError(f"{path}: no savegame checkpoint in this directory")
    sizes = {name: checkpoint_bytes(storage, name) for name in names}
    out, bad, gone, damaged = console(), 0, 0, []
    with ByteProgress() as bar:
        bar.phase("verifying", sum(sizes.values()))
        counting = CountingStorage(storage, on_read=bar.advance)
        for name in names:
            bar.describe(f"verifying {name}")
            problems = reader.verify_checkpoint(counting, name)
            if problems and not storage.exists(name):  # deleted while being checked (a trainer's retention)
                gone += 1
                out.print(f"gone    {name} (deleted while being checked)")
            elif problems:
                bad += 1
                damaged += problems
                out.print(Text(f"DAMAGED {name}: " + "; ".join(problems), style="bold red"))
            else:
                out.print(f"ok      {name} ({human_bytes(sizes[name])})")
    checked = len(names) - gone
    for pack, users in store.users_of(storage, names, damaged).items():
        out.print(Text(f"shared pack {pack} is damaged: used by {len(users)} checkpoint(s): {', '.join(users)}",
                       style="bold red"))
    if bad:
        out.print(Text(f"{bad} of {checked} checkpoint(s) damaged", style="bold red"))
        click.get_current_context().exit(FINDING)
    out.print(f"all {checked} checkpoint(s) intact" + (f" ({gone} deleted while being checked)" if gone else ""))


# -- prune ---------------------------------------------------------------------------------

@click.command("prune")
@click.argument("run_dir", type=RUN_DIR)
@click.option("--keep-last", type=click.IntRange(min=1), required=True, metavar="N",
              help="Keep the N newest checkpoints (besides best and pinned ones).")
@click.option("--dry-run", is_flag=True, help="Only print what would be deleted.")
def prune(run_dir: str, keep_last: int, dry_run: bool) -> None:
    """Delete the checkpoints of RUN_DIR except the newest N, the best ones and pinned ones.

    Takes the run directory's writer lock: it refuses to run while a trainer writes there.
    """
    require_run_dir(run_dir)
    storage = open_storage(run_dir)
    if not RunDir(storage).names():  # nothing to delete: leave the directory untouched
        console().print(f"nothing to prune: {run_dir} holds no checkpoint")
        return
    lock = None
    if not dry_run:
        lock = writer_lock(storage)
        try:
            lock.acquire()
        except RunLockedError as exc:
            raise CliError(f"{run_dir} is locked: a trainer (or another savegame command) is writing to it; "
                           "prune after it stops, or see what would go with --dry-run") from exc
    try:
        if lock is not None:  # the lock holder removes what a writer killed mid-save left (hidden temporaries)
            RunDir(storage).commit.clean_leftovers(storage)
        _prune(run_dir, keep_last, dry_run)
    finally:
        if lock is not None:
            lock.release()


def plan_prune(rows: list[Row], keep_last: int, *, modes: Mapping[str, str] | None = None,
               settings: RunSettings | None = None) -> tuple[set[str], dict[str, str]]:
    """(names to delete, why each checkpoint is kept or deleted).

    Kept: the ``keep_last`` newest intact checkpoints; the best ``best_k`` (of the settings,
    else 1) intact ones by their recorded metrics for each metric of ``modes``; the
    targets of best aliases; every multiple of the run's ``keep_every``; pinned ones;
    and the newest checkpoint whatever its state (the library never deletes that one).
    """
    records = [row.record() for row in rows]
    intact = {row.name for row in rows if not row.problems}
    why: dict[str, list[str]] = {row.name: [] for row in rows}
    chosen: list[tuple[policies.Policy, str]] = [
        (_on_intact(policies.keep_last(keep_last), intact), f"newest {keep_last}"),
        (policies.keep_pinned(), "pinned")]
    best_k = settings.best_k if settings is not None else 1
    for metric, mode in (modes or {}).items():
        label = f"best {metric} ({mode})" if best_k == 1 else f"best {best_k} {metric} ({mode})"
        chosen.append((_on_current(policies.keep_best(metric, mode, best_k), intact), label))
    if settings is not None and settings.keep_every is not None:
        chosen.append((policies.keep_every(settings.keep_every), f"keep_every={settings.keep_every} of the run"))
    for policy, label in chosen:
        for name in policy(records):
            why[name].append(label)
    for row in rows:
        why[row.name] += [f"alias {a}" for a in row.aliases if a == "best" or a.startswith("best:")]
    best = {row.name for row in rows if any(r.startswith("alias") for r in why[row.name])}
    doomed = set(policies.to_delete(records, [p for p, _ in chosen], protected=best))
    reasons = {}
    for row in rows:
        if row.name in doomed:
            reasons[row.name] = "damaged" if row.problems else f"older than the newest {keep_last}"
        else:
            reasons[row.name] = ", ".join(why[row.name]) or "newest checkpoint"
    return doomed, reasons


def _on_intact(policy: policies.Policy, intact: set[str]) -> policies.Policy:
    return lambda records: policy([r for r in records if r.name in intact])


def _on_current(policy: policies.Policy, intact: set[str]) -> policies.Policy:
    return lambda records: policy(policies.latest_saves(r for r in records if r.name in intact))


def _prune(run_dir: str, keep_last: int, dry_run: bool) -> None:
    rows = scan(run_dir)
    storage = open_storage(run_dir)
    settings = run_settings.read(storage)
    modes = run_modes(rows, RunDir(storage), settings)
    doomed, reasons = plan_prune(rows, keep_last, modes=modes, settings=settings)
    out = console()
    table = new_table(f"{run_dir}: prune --keep-last {keep_last}" + (" (dry run)" if dry_run else ""),
                      "checkpoint", "step", "size", "action", "why", right=("step", "size"))
    for row in rows:
        action = Text("delete", style="red") if row.name in doomed else Text("keep", style="green")
        table.add_row(row.name, str(row.step), human_bytes(row.bytes), action, reasons[row.name])
    out.print(table)
    freed = sum(row.own for row in rows if row.name in doomed)
    if dry_run:
        out.print(f"would delete {len(doomed)} checkpoint(s), {human_bytes(freed)}; nothing was deleted (dry run)"
                  if doomed else f"nothing to prune: all {len(rows)} checkpoint(s) are kept")
        return
    run = RunDir(storage)
    for row in rows:
        if row.name in doomed:
            run.commit.delete(storage, row.name)
    if doomed:
        try:  # the packs only the deleted checkpoints used (the lock is held: no save is in flight)
            store.ContentStore(storage).sweep()
        except StorageError as exc:
            out.print(Text(f"warning: the content store could not be swept ({exc}); the next writer does it",
                           style="yellow"))
    out.print(f"deleted {len(doomed)} checkpoint(s), freed {human_bytes(freed)}"
              if doomed else f"nothing to prune: all {len(rows)} checkpoint(s) are kept")
    kept = [row.record() for row in rows if row.name not in doomed and not row.problems]
    try:  # a crash can leave alias files naming an older checkpoint, or one this prune just deleted
        fixed = run.write_aliases(policies.alias_targets(kept, modes), modes, only_stale=True)
    except StorageError as exc:
        out.print(Text(f"warning: the alias files could not be rewritten ({exc}); they are hints only", style="yellow"))
        return
    if fixed:
        out.print(f"rewrote the stale alias(es) {', '.join(fixed)}")
