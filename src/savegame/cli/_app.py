"""The ``savegame`` click group: exit codes, one-line errors, and the library's logs on stderr.

Exit codes: 0 ok, 1 a finding (a damaged checkpoint, differences with ``--exit-code``),
2 a usage error or input that cannot be read. Errors are one line on stderr,
``savegame: error: ...``; ``savegame --debug ...`` adds the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import click

from savegame.errors import SavegameError

OK, FINDING, FAILURE = 0, 1, 2
BROKEN_PIPE = 141  # what a shell reports for a process killed by SIGPIPE


class CliError(click.ClickException):
    """A failure to report as one line, with an exit code (2 unless said otherwise)."""

    exit_code = FAILURE


class App(click.Group):
    """The ``savegame`` group: turns every failure into one line on stderr and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug"))
        with _logging(debug):
            try:
                return super().invoke(ctx)
            except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
                raise
            except BrokenPipeError:  # "savegame ls --json | head": the reader left; not an error
                broken_pipe()
            except Exception as exc:
                if debug:
                    traceback.print_exc(file=sys.stderr)
                raise CliError(_describe(exc)) from exc

    def main(self, *args: Any, **kwargs: Any) -> NoReturn:
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError" and exc.ctx is not None:  # bare "savegame": the help
                click.echo(exc.ctx.get_help())
                sys.exit(FAILURE)
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            _fail(exc.format_message() + hint, FAILURE)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except (click.Abort, KeyboardInterrupt):
            _fail("interrupted", 130)
        sys.exit(code if isinstance(code, int) else OK)


def _describe(exc: Exception) -> str:
    if isinstance(exc, (SavegameError, OSError)):
        return str(exc) or type(exc).__name__
    return f"unexpected {type(exc).__name__}: {exc} (a bug in savegame; rerun with --debug for the traceback)"


def broken_pipe() -> NoReturn:
    # Python's recommended way: point stdout at devnull so the final flush cannot fail again.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(BROKEN_PIPE)


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"savegame: error: {' '.join(message.split())}", err=True)
    sys.exit(code)


class _EchoHandler(logging.Handler):
    """Library log records on stderr (resolved at each record, so redirections are followed)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"savegame: {record.levelname.lower()}: {record.getMessage()}", err=True)


@contextmanager
def _logging(debug: bool) -> Iterator[None]:
    """Show the library's warnings (all its logs with --debug) for one command, then restore logging."""
    logger = logging.getLogger("savegame")
    handler, level = _EchoHandler(logging.DEBUG if debug else logging.WARNING), logger.level
    logger.addHandler(handler)
    if debug:
        logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
