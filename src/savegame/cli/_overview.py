"""What ``savegame ls`` says beyond one run's table: the runs inside a folder of runs, and abandoned checkpoints."""

from __future__ import annotations

import os

from rich.console import Console

from savegame.cli._output import human_age, human_bytes, metrics_text, new_table
from savegame.cli._paths import disk_bytes
from savegame.format import names as n
from savegame.run.directory import RunDir
from savegame.storage.local import LocalStorage


def print_child_runs(out: Console, folder: str) -> bool:
    """List the run directories directly inside ``folder``; False when it holds none."""
    try:
        children = sorted(e.path for e in os.scandir(folder) if e.is_dir(follow_symlinks=False))
    except OSError:
        return False
    runs = [(path, RunDir(LocalStorage(path))) for path in children]
    runs = [(path, run) for path, run in runs if run.names()]
    if not runs:
        return False
    table = new_table(f"{folder}: no checkpoints here, but {len(runs)} run director{'y' if len(runs) == 1 else 'ies'}",
                      "run", "checkpoints", "latest step", "latest metrics", "size", "age",
                      right=("checkpoints", "latest step", "size", "age"))
    for path, run in runs:
        infos = run.infos()
        newest = max(infos, key=lambda i: (i.step, i.time), default=None)
        size = sum(disk_bytes(os.path.join(path, name)) for name in run.names())
        table.add_row(os.path.basename(path), str(len(run.names())), str(newest.step) if newest else "?",
                      metrics_text(newest.metrics) if newest else "", human_bytes(size),
                      human_age(newest.time if newest else None))
    out.print(table)
    out.print(f"list one with: savegame ls {os.path.join(folder, os.path.basename(runs[0][0]))}")
    return True


def print_abandoned(out: Console, run_dir: str) -> None:
    """One line about checkpoints moved to ``abandoned/`` (an older restore, or fresh=True): not listed above."""
    base = os.path.join(run_dir, n.ABANDONED_DIR)
    try:
        folders = sorted(e.path for e in os.scandir(base) if e.is_dir(follow_symlinks=False))
    except OSError:
        return
    count = sum(len(RunDir(LocalStorage(folder)).names()) for folder in folders)
    if count:
        out.print(f"{count} checkpoint(s) were moved aside to {base} ({len(folders)} folder(s)); they are not "
                  "listed, restored or pruned")
