"""``plot``: a run's metrics history (``metrics.jsonl``) as an image, one panel per metric."""

from __future__ import annotations

import math
import os
from typing import Any

import click

from savegame.cli._app import CliError
from savegame.cli._output import console
from savegame.cli._paths import RUN_DIR, atomic_output, require_run_dir
from savegame.errors import StorageError
from savegame.format import names as n
from savegame.run import history as run_history
from savegame.storage.urls import open_storage

History = dict[str, dict[int, float]]  # metric -> step -> value (the last recorded for that step)


def read_history(run_dir: str) -> tuple[History, int]:
    """Every metric by step, and how many lines could not be read (torn by a crash, or damaged)."""
    storage = open_storage(run_dir)
    if not storage.exists(n.HISTORY_FILE):
        raise CliError(f"{run_dir}: no {n.HISTORY_FILE} (no checkpoint was saved with metrics here)")
    try:
        records, skipped = run_history.read(storage)
    except StorageError as exc:
        raise CliError(f"{run_dir}: {n.HISTORY_FILE} cannot be read: {exc}") from exc
    out: History = {}
    for record in records:
        for name, value in record["metrics"].items():
            out.setdefault(name, {})[record["step"]] = value
    return out, skipped


@click.command("plot")
@click.argument("run_dir", type=RUN_DIR)
@click.option("--to", "target", required=True, type=click.Path(dir_okay=False),
              help="Image file (.png, .svg, .pdf ...: any format matplotlib writes).")
@click.option("--metric", "metrics", multiple=True, metavar="NAME", help="Plot only this metric (repeatable).")
def plot(run_dir: str, target: str, metrics: tuple[str, ...]) -> None:
    """Plot the metrics history of RUN_DIR against the step, one panel per metric."""
    require_run_dir(run_dir)
    history, skipped = read_history(run_dir)
    missing = [m for m in metrics if m not in history]
    if missing:
        raise CliError(f"no metric {', '.join(map(repr, missing))} in {run_dir}; "
                       f"it has {', '.join(history) or 'none'}")
    names = list(metrics) or list(history)
    if not names:
        raise CliError(f"{run_dir}: {n.HISTORY_FILE} holds no metrics")
    fmt = os.path.splitext(target)[1].lstrip(".").lower() or "png"
    figure = draw(run_dir, history, names)
    with atomic_output(target) as tmp:
        try:
            figure.savefig(tmp, format=fmt, dpi=110)
        except ValueError as exc:  # an unknown format
            raise CliError(f"--to {target!r}: {exc}") from exc
    out = console()
    out.print(f"plotted {', '.join(names)} ({sum(len(history[m]) for m in names)} points) to {target}")
    if skipped:
        out.print(f"note: skipped {skipped} unreadable line(s) of {n.HISTORY_FILE}")


def draw(run_dir: str, history: History, names: list[str]) -> Any:
    # The object-oriented API with the Agg canvas: no pyplot, no global backend, no display needed.
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise CliError(f"plot needs matplotlib ({exc}): pip install 'savegame[plot]'") from exc

    figure = Figure(figsize=(8, 2.4 * len(names) + 0.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    for ax, name in zip(axes, names):
        points = sorted(history[name].items())
        steps = [s for s, _ in points]
        values = [v if math.isfinite(v) else math.nan for _, v in points]
        ax.plot(steps, values, marker="o" if len(points) <= 50 else None, markersize=3, linewidth=1.2)
        bad = [s for s, v in points if not math.isfinite(v)]
        if bad:
            ax.plot(bad, [0] * len(bad), "x", color="red", transform=ax.get_xaxis_transform(), label="nan/inf")
            ax.legend(loc="best", fontsize="small")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(os.path.basename(os.path.abspath(run_dir)))
    return figure
