"""What every verb shares: exit codes, error reporting, consoles, paths, JSON output, atomic files.

Exit codes: 0 ok, 1 a finding (a damaged checkpoint, differences with ``--exit-code``),
2 a usage error or input that cannot be read. Errors are one line on stderr,
``savegame: error: ...``; ``savegame --debug ...`` adds the traceback.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import sys
import time
import traceback
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click
import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from savegame.errors import SavegameError
from savegame.format import names as n
from savegame.run_dir import RunDir, parse_step
from savegame.storage.local import LocalStorage

OK, FINDING, FAILURE = 0, 1, 2
BROKEN_PIPE = 141  # what a shell reports for a process killed by SIGPIPE
PROGRESS_MIN_BYTES = 256 * 2**20  # about a second of reading or writing: below that a bar only flickers


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
                _broken_pipe()
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


def _broken_pipe() -> NoReturn:
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


# -- consoles ------------------------------------------------------------------------------

def console(*, stderr: bool = False) -> Console:
    """A rich console on the current stdout (or stderr); 120 columns when not a terminal.

    Markup is off: checkpoint names and state keys are printed as they are ("layers[0]").
    """
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or "COLUMNS" in os.environ else 120
    return _Console(file=stream, stderr=stderr, width=width, markup=False, highlight=False, soft_wrap=True)


class _Console(Console):
    def on_broken_pipe(self) -> None:  # rich would exit 1, which here means "a finding"
        self.quiet = True
        _broken_pipe()


def new_table(title: str | None, *columns: str, right: tuple[str, ...] = ()) -> Table:
    """A table whose long cells (key paths, checkpoint names) wrap instead of being cut off."""
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left", overflow="fold")
    return table


def progress(total: int) -> Progress:
    """A transient byte progress bar on stderr, shown only on a terminal and for big jobs."""
    err = console(stderr=True)
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True,
                    disable=not err.is_terminal or total < PROGRESS_MIN_BYTES)


def echo_json(value: Any) -> None:
    click.echo(json.dumps(jsonable(value), indent=2, allow_nan=False))


# -- locating checkpoints ------------------------------------------------------------------

def locate(path: str) -> tuple[LocalStorage, str]:
    """(storage of the run directory, checkpoint name) for a checkpoint dir, its manifest, or a run dir (newest)."""
    p = Path(os.path.abspath(path))
    if p.name == n.MANIFEST:
        p = p.parent
    if (p / n.MANIFEST).is_file() or (p.is_dir() and parse_step(p.name) is not None):
        return LocalStorage(str(p.parent)), p.name
    if p.is_dir():
        names = RunDir(LocalStorage(str(p))).names()
        if names:
            return LocalStorage(str(p)), names[-1]
        raise CliError(f"{path}: no savegame checkpoint in this directory")
    if p.exists():
        raise CliError(f"{path}: not a savegame checkpoint directory or run directory")
    raise CliError(f"{path}: no such file or directory")


def is_checkpoint_dir(path: str) -> bool:
    p = Path(os.path.abspath(path))
    return (p / n.MANIFEST).is_file() or (p.is_dir() and parse_step(p.name) is not None)


def disk_bytes(directory: str) -> int:
    """Bytes of the files directly in ``directory`` (a checkpoint has no subdirectories)."""
    try:
        return sum(e.stat().st_size for e in os.scandir(directory) if e.is_file(follow_symlinks=False))
    except OSError:
        return 0


# -- formatting ----------------------------------------------------------------------------

def human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_age(when: float | None, now: float | None = None) -> str:
    if not when:
        return "?"
    seconds = max(0.0, (now or time.time()) - when)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def metrics_text(metrics: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={number(v)}" for k, v in metrics.items())


def short(value: Any, limit: int = 60) -> str:
    """A one-line description of a value, cut to ``limit`` characters."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return tensor_text(value)
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"{type(value).__name__} of {len(value)} items"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dtype_name(t: torch.Tensor | np.ndarray) -> str:
    return str(t.dtype).removeprefix("torch.")


def tensor_text(t: torch.Tensor | np.ndarray) -> str:
    return f"{dtype_name(t)} {list(t.shape)}"


def nbytes(t: torch.Tensor | np.ndarray) -> int:
    if isinstance(t, np.ndarray):
        return int(t.nbytes)
    return t.numel() * t.element_size()


def jsonable(value: Any) -> Any:
    """Plain JSON for any value a checkpoint holds (tensors become {dtype, shape})."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((jsonable(v) for v in value), key=repr)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return {"dtype": dtype_name(value), "shape": list(value.shape)}
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, complex):
        return [jsonable(value.real), jsonable(value.imag)]
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return str(value)


# -- writing files -------------------------------------------------------------------------

@contextmanager
def atomic_output(target: str) -> Iterator[str]:
    """Yield a temporary path next to ``target``; on success it replaces ``target`` durably, else it goes."""
    final = os.path.abspath(target)
    directory = os.path.dirname(final)
    if not os.path.isdir(directory):
        raise CliError(f"{target}: the directory {directory!r} does not exist")
    tmp = os.path.join(directory, f".{os.path.basename(final)}.{uuid.uuid4().hex[:8]}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as for any new file
    mode = os.stat(tmp).st_mode & 0o777
    try:
        yield tmp
        os.chmod(tmp, mode)  # writers that replace the file (safetensors) create it 0600
        _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, final)
        if os.name != "nt":
            _fsync(directory, os.O_RDONLY)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _fsync(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
