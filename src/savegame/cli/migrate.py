"""``migrate``: import a checkpoint written by another tool into a savegame run directory."""

from __future__ import annotations

from typing import Any

import click
from rich.panel import Panel
from rich.text import Text

from savegame.cli._common import console, metrics_text, new_table
from savegame.run_dir import RunDir
from savegame.storage.local import LocalStorage

TRUST_WARNING = (
    "--trust: the globals this file names will be IMPORTED and CALLED while it loads. A malicious file "
    "can run any code on this machine. Only use --trust for files you would also run as a script."
)


@click.command("migrate")
@click.argument("src", type=click.Path(exists=True))
@click.option("--to", "run_dir", required=True, type=click.Path(file_okay=False),
              help="Run directory to write the imported checkpoint into (created if needed).")
@click.option("--step", type=click.IntRange(min=0), help="Step to record (default: the step the file records).")
@click.option("--trust", is_flag=True, help="Allow the globals the file needs (runs their code: trusted files only).")
@click.option("--drop-unsafe", is_flag=True,
              help="Drop objects that need refused globals, when the import does not need them.")
def migrate(src: str, run_dir: str, step: int | None, trust: bool, drop_unsafe: bool) -> None:
    """Import the foreign checkpoint SRC (a file or a directory) as a checkpoint of RUN_DIR.

    Loading never runs code from SRC unless --trust is given. Prints the layout detected,
    where each foreign key went, and what was left out.
    """
    from savegame.migrate import import_checkpoint  # torch-pickle machinery: only when asked for
    from savegame.offline import write_tree

    out, err = console(), console(stderr=True)
    if trust:
        err.print(Panel(TRUST_WARNING, title="WARNING", style="bold red"))
    fc = import_checkpoint(src, trust=trust, drop_unsafe=drop_unsafe)  # its errors say when --trust/--drop-unsafe help
    existing = RunDir(LocalStorage(run_dir)).names()
    path = write_tree(run_dir, fc.tree, step=fc.step if step is None else step, epoch=fc.epoch, metrics=fc.metrics)
    _report(out, src, fc, path)
    if existing:
        out.print(f"note: {run_dir} already had {len(existing)} checkpoint(s); the import is the newest "
                  "only if its step is the highest")


def _report(out: Any, src: str, fc: Any, path: str) -> None:
    out.print(f"layout: {fc.layout}")
    out.print(f"step {fc.step}, epoch {fc.epoch}" + (f", metrics {metrics_text(fc.metrics)}" if fc.metrics else ""))
    table = new_table(f"{src}: what was imported", "foreign key", "savegame")
    for line in fc.mapped:
        source, _, target = line.partition(" -> ")
        table.add_row(source, target)
    for line in fc.left_out:
        table.add_row(line, Text("left out", style="yellow"))
    out.print(table)
    out.print(f"wrote {path}")


import_alias = click.Command("import", callback=migrate.callback, params=migrate.params, help=migrate.help,
                             hidden=True)
