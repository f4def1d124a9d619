"""``savegame ls`` of a folder of runs lists the runs; moved-aside checkpoints are mentioned; one unit for sizes."""

from __future__ import annotations

import io

import torch
from click.testing import CliRunner
from rich.console import Console

import savegame
from savegame.cli import main
from savegame.cli._output import human_bytes
from savegame.cli._progress import ByteProgress


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def make_run(path, steps, **kwargs):
    with savegame.Checkpointer(path, {"model": torch.nn.Linear(2, 2)}, async_save=False, **kwargs) as ckpt:
        for step in steps:
            ckpt.save(step, metrics={"loss": 1.0 / step})


def test_ls_of_a_folder_of_runs_lists_the_runs(tmp_path):
    make_run(tmp_path / "exp1", [1, 2])
    make_run(tmp_path / "exp2", [5])
    (tmp_path / "notes").mkdir()
    out = cli("ls", tmp_path)
    assert out.exit_code == 0, out.output
    assert "2 run directories" in out.output and "exp1" in out.output and "exp2" in out.output
    assert "notes" not in out.output and "no checkpoints in" not in out.output
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"no checkpoints in {empty}" in cli("ls", empty).output


def test_ls_mentions_checkpoints_moved_aside(tmp_path):
    make_run(tmp_path, [1, 2, 3])
    with savegame.Checkpointer(tmp_path, {"model": torch.nn.Linear(2, 2)}, fresh=True, async_save=False) as ckpt:
        assert "3 checkpoint(s) were moved aside" in cli("ls", tmp_path).output  # before the new run's first save
        ckpt.save(1)
    out = cli("ls", tmp_path)
    assert out.exit_code == 0 and "1 checkpoint(s)" in out.output
    assert f"3 checkpoint(s) were moved aside to {tmp_path / 'abandoned'}" in out.output


def test_progress_bars_use_the_units_of_the_tables():
    buffer = io.StringIO()
    with ByteProgress(Console(file=buffer, force_terminal=True, width=120), delay=0) as bar:
        bar.phase("verifying", 3 * 1024 * 1024)
        bar.advance(1024 * 1024)
        bar._bar.refresh()
    assert "MiB" in buffer.getvalue() and "MB " not in buffer.getvalue()
    assert human_bytes(3 * 1024 * 1024) == "3.0 MiB"


def test_verify_refuses_a_file_and_takes_an_address(tmp_path):
    make_run(tmp_path / "run", [1, 2], best={"loss": "min"})
    (tmp_path / "notes.txt").write_text("hi")
    out = cli("verify", tmp_path / "notes.txt")
    assert out.exit_code == 2 and "is a file" in out.output
    out = cli("verify", f"{tmp_path / 'run'}@1")
    assert out.exit_code == 0 and "step-0000000001" in out.output and "step-0000000002" not in out.output
