"""The ``savegame`` command: inspect, verify, compare, export, prune, plot and import checkpoints.

One module per group of verbs; this file only assembles them. The library never
prints; these commands do, with rich. Exit codes: 0 ok, 1 a finding, 2 a usage
error or unreadable input (see docs/cli.md).
"""

from __future__ import annotations

import click

from savegame._version import __version__
from savegame.cli import export, inspect, migrate, plot, runs
from savegame.cli._app import App


@click.group(cls=App, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Print the traceback of an error, and debug logs.")
@click.version_option(__version__, prog_name="savegame")
def main(debug: bool) -> None:
    """Inspect, verify, compare, export, prune, plot and import savegame checkpoints."""


for _command in (runs.ls, runs.verify, inspect.inspect_cmd, inspect.diff, export.export, runs.prune, plot.plot,
                 migrate.migrate):
    main.add_command(_command)
main.add_command(migrate.import_alias)

__all__ = ["main"]
