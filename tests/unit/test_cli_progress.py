"""Progress by bytes: bars on terminals once a job runs past a second, fed by the bytes each read moves."""

from __future__ import annotations

import io
from pathlib import Path

import click
import pytest
import torch
from rich.console import Console

import savegame
from savegame.cli._progress import ByteProgress
from savegame.cli.migrate import ByteSize
from savegame.engine import reader
from savegame.storage.counting import CountingStorage
from savegame.storage.local import LocalStorage


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def terminal(is_terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=is_terminal, width=100), out


def test_bar_appears_on_a_terminal_once_the_job_has_run_a_second() -> None:
    err, out = terminal(True)
    clock = Clock()
    with ByteProgress(err, clock=clock) as bar:
        bar.phase("reading big.pt", 1000)
        bar.advance(100)
        assert not bar.shown and out.getvalue() == ""  # a fast job never flickers
        clock.now += 1.5
        bar.advance(400)
        assert bar.shown
    assert "reading big.pt" in out.getvalue()


def test_no_bar_when_stderr_is_not_a_terminal() -> None:
    err, out = terminal(False)
    clock = Clock()
    with ByteProgress(err, clock=clock) as bar:
        bar.phase("writing", 10)
        clock.now += 60
        bar.advance(10)
        assert not bar.shown
    assert out.getvalue() == ""


def test_verify_progress_advances_within_one_checkpoint(tmp_path: Path) -> None:
    class Big:
        def state_dict(self) -> dict[str, torch.Tensor]:
            return {f"t{i}": torch.full((1000,), float(i)) for i in range(5)}

        def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
            pass

    with savegame.Checkpointer(tmp_path / "run", state={"big": Big()}, async_save=False) as ckpt:
        ckpt.save(1)
    seen: list[int] = []
    storage = CountingStorage(LocalStorage(str(tmp_path / "run")), on_read=seen.append)
    assert reader.verify_checkpoint(storage, "step-0000000001") == []
    assert len([n for n in seen if n]) >= 5  # every tensor's bytes, as they are read: not one jump at the end
    files = sorted((tmp_path / "run" / "step-0000000001").iterdir())
    assert sum(seen) == sum(f.stat().st_size for f in files)  # every byte of every file, once


@pytest.mark.parametrize("text, size", [("1000000", 1000000), ("512MiB", 512 * 2**20), ("2G", 2 * 2**30),
                                        ("1.5 GB", 3 * 2**29), ("64k", 65536)])
def test_byte_sizes(text: str, size: int) -> None:
    assert ByteSize().convert(text, None, None) == size


@pytest.mark.parametrize("text", ["", "lots", "-5", "0", "3 parsecs"])
def test_bad_byte_sizes(text: str) -> None:
    with pytest.raises(click.BadParameter):
        ByteSize().convert(text, None, None)
