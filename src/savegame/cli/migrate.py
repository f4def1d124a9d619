"""``migrate``: import a checkpoint written by another tool into a savegame run directory."""

from __future__ import annotations

import re
from typing import Any

import click
from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from savegame.cli._output import console, human_bytes, metrics_text, new_table
from savegame.cli._progress import ByteProgress
from savegame.run.directory import RunDir, parse_step
from savegame.storage.urls import is_url, open_storage

TRUST_WARNING = (
    "--trust: the classes this file names will be IMPORTED, and their constructors and __setstate__ RUN, while it "
    "loads. Functions, builtins and modules stay refused, but a malicious file can still abuse a class to run code "
    "on this machine. Only use --trust for files you would also run as a script."
)
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)", re.IGNORECASE)


class RunTarget(click.Path):
    """Where an import goes: a run directory (created if needed), or the URL of a run on an object store."""

    def __init__(self) -> None:
        super().__init__(file_okay=False)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return value if is_url(value) else super().convert(value, param, ctx)


class ByteSize(click.ParamType[int]):
    """A number of bytes: ``1000000``, ``512MiB``, ``2GB``, ``1.5G`` (K/M/G/T count 1024s)."""

    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        found = _SIZE.fullmatch(str(value).strip())
        if found is None or float(found.group(1)) <= 0:
            self.fail(f"{value!r} is not a size such as 2GiB, 512M or 1000000", param, ctx)
        unit = 1024 ** " kmgt".index(found.group(2).lower() or " ")
        return max(1, int(float(found.group(1)) * unit))


@click.command("migrate")
@click.argument("src", type=click.Path(exists=True))
@click.option("--to", "run_dir", required=True, type=RunTarget(), metavar="RUN_DIR|URL",
              help="Run directory to write the imported checkpoint into (created if needed), or the URL of a run "
                   "on an object store (s3://bucket/runs/x).")
@click.option("--step", type=click.IntRange(min=0), help="Step to record (default: the step the file records).")
@click.option("--drop-unsafe", is_flag=True,
              help="Drop objects that need refused globals, when the import does not need them.")
@click.option("--trust", is_flag=True, help="Allow the classes the file names (runs their code: trusted files only).")
@click.option("--max-bytes", type=ByteSize(), metavar="SIZE",
              help="Memory a file may claim while loading (default: 4 x its size + 64 MiB).")
@click.option("--rename", "renames", multiple=True, metavar="OLD=NEW",
              help="Give an imported state another name, e.g. optimizer_1=disc_optimizer (repeatable).")
def migrate(src: str, run_dir: str, step: int | None, drop_unsafe: bool, trust: bool, max_bytes: int | None,
            renames: tuple[str, ...]) -> None:
    """Import the foreign checkpoint SRC (a file or a directory) as a checkpoint of the run given by --to.

    Loading never runs code from SRC unless --trust is given. Prints the layout detected,
    where each foreign key went, what was left out, and what to do to resume.
    """
    from savegame.engine.offline import write_tree
    from savegame.migrate import (  # torch-pickle machinery: only when asked for
        import_checkpoint,
        input_bytes,
    )

    rename = _parse_renames(renames)
    out, err = console(), console(stderr=True)
    if trust:
        # wrapped inside the panel: the console's soft wrap would cut the panel's lines at its border
        err.print(Panel(TRUST_WARNING, title="WARNING", style="bold red"), soft_wrap=False)
    target = open_storage(run_dir)
    if is_url(run_dir):  # the bucket exists and is reachable: known before a large file is read
        target.makedirs("")
    existing = RunDir(target).names()
    with ByteProgress(err) as bar:
        bar.phase(f"reading {src}", input_bytes(src))
        fc = import_checkpoint(src, trust=trust, drop_unsafe=drop_unsafe, step=step, max_bytes=max_bytes,
                               progress=bar.advance, rename=rename)
        bar.phase(f"writing step {fc.step} to {run_dir}", _tensor_bytes(fc.tree))
        path = write_tree(run_dir, fc.tree, step=fc.step, epoch=fc.epoch, metrics=fc.metrics, history=fc.history,
                          extra=fc.extra or None, progress=bar.advance)
    _report(out, src, fc, path)
    newer = [name for name in existing if (parse_step(name) or 0) > fc.step]
    if newer:
        out.print(f"note: {run_dir} already has {len(newer)} checkpoint(s) with a higher step (newest {newer[-1]}); "
                  "restore('latest') picks those, so restore this one by its step or path")


def _parse_renames(renames: tuple[str, ...]) -> dict[str, str]:
    parsed: dict[str, str] = {}
    for item in renames:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise click.BadParameter(f"{item!r} is not OLD=NEW (e.g. optimizer_1=disc_optimizer)",
                                     param_hint="--rename")
        if old in parsed:
            raise click.BadParameter(f"{old!r} is renamed twice", param_hint="--rename")
        parsed[old] = new
    return parsed


def _tensor_bytes(tree: Any) -> int:
    import torch

    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_tensor_bytes(v) for v in tree)
    return 0


def _report(out: Console, src: str, fc: Any, path: str) -> None:
    out.print(f"layout: {fc.layout}")
    out.print(f"step {fc.step}, epoch {fc.epoch}" + (f", metrics {metrics_text(fc.metrics)}" if fc.metrics else ""))
    table = new_table(f"{src}: what was imported", "foreign key", "savegame")
    for line in fc.mapped:
        source, _, target = line.partition(" -> ")
        table.add_row(source, target)
    for line in fc.left_out:
        table.add_row(line, Text("left out", style="yellow"))
    out.print(table)
    if fc.history:
        out.print(f"metrics history: {len(fc.history)} line(s) written to metrics.jsonl (savegame plot shows them)")
    out.print(f"wrote {path} ({human_bytes(_tensor_bytes(fc.tree))} of tensors)")
    for note in fc.notes:
        out.print(Text(f"to resume: {note}", style="bold yellow"))


import_alias = click.Command("import", callback=migrate.callback, params=migrate.params, help=migrate.help,
                             hidden=True)
