"""A run directory with links in it: nothing is written or read outside it.

Each test plants a symbolic link (or a FIFO) where savegame keeps a file or a
checkpoint, pointing at data outside the run directory, and checks that the data
out there is neither changed nor read: writes are refused with an error naming the
link, and a checkpoint made of links is damaged, so restore falls back and verify
reports it.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import savegame
from savegame.cli import main
from savegame.errors import CorruptCheckpointError, StorageError

PRECIOUS = b"precious data that is not savegame's\n"


def step(k: int) -> str:
    return f"step-{k:010d}"


def make_run(run: Path) -> torch.nn.Linear:
    model = torch.nn.Linear(2, 2)
    with savegame.Checkpointer(run, {"model": model}, async_save=False) as ckpt:
        for k in (1, 2):
            with torch.no_grad():
                model.weight.fill_(k)
            ckpt.save(k, metrics={"loss": 1.0 / k})
    return model


def outside_file(tmp_path: Path) -> Path:
    target = tmp_path / "outside" / "file"
    target.parent.mkdir()
    target.write_bytes(PRECIOUS)
    return target


def cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_a_linked_lock_file_is_neither_truncated_nor_written(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    target = outside_file(tmp_path)
    (run / ".savegame.lock").unlink()
    (run / ".savegame.lock").symlink_to(target)
    with pytest.raises(StorageError, match=r"\.savegame\.lock' is a symbolic link .*remove it"):
        savegame.Checkpointer(run, {"model": torch.nn.Linear(2, 2)})
    result = cli("prune", run, "--keep-last", "1")
    assert result.exit_code == 2 and "symbolic link" in result.output, result.output
    assert target.read_bytes() == PRECIOUS
    assert (run / step(1)).is_dir(), "prune deleted a checkpoint without holding the lock"


def test_a_linked_history_is_not_appended_to(tmp_path, caplog):
    run = tmp_path / "run"
    make_run(run)
    target = outside_file(tmp_path)
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(target)
    with caplog.at_level(logging.WARNING, "savegame"), \
            savegame.Checkpointer(run, {"model": torch.nn.Linear(2, 2)}, async_save=False) as ckpt:
        ckpt.restore()
        ckpt.save(3, metrics={"loss": 0.1})
    assert target.read_bytes() == PRECIOUS
    assert "metrics.jsonl' is a symbolic link" in caplog.text
    assert (run / step(3) / "manifest.json").is_file(), "the checkpoint itself is saved"
    result = cli("plot", run, "--to", tmp_path / "history.png")
    assert result.exit_code == 2 and "metrics.jsonl' is a symbolic link" in result.output, result.output


def test_linked_alias_files_are_neither_read_nor_written_through(tmp_path, caplog):
    run = tmp_path / "run"
    make_run(run)
    target = outside_file(tmp_path)
    target.write_text(f'{{"alias": "latest", "target": "{step(1)}"}}')
    planted = target.read_bytes()
    (run / "latest.alias.json").unlink()
    (run / "latest.alias.json").symlink_to(target)
    with caplog.at_level(logging.WARNING, "savegame"), \
            savegame.Checkpointer(run, {"model": torch.nn.Linear(2, 2)}, async_save=False) as ckpt:
        assert ckpt.restore().step == 2  # the link's claim is not read
        ckpt.save(3)
    assert target.read_bytes() == planted
    assert "latest.alias.json' is a symbolic link" in caplog.text


@pytest.mark.parametrize("what", ["tensor file", "checkpoint directory"])
def test_a_checkpoint_made_of_links_is_damaged(tmp_path, caplog, what):
    """Moved out and linked back, checksums and all intact: still refused, naming the link."""
    run = tmp_path / "run"
    make_run(run)
    (tmp_path / "outside").mkdir()
    inside = run / step(2) / "tensors-00000.safetensors" if what == "tensor file" else run / step(2)
    moved = tmp_path / "outside" / inside.name
    shutil.move(inside, moved)
    inside.symlink_to(moved)
    model = torch.nn.Linear(2, 2)
    with caplog.at_level(logging.WARNING, "savegame"), savegame.Checkpointer(run, {"model": model}) as ckpt:
        assert ckpt.restore().step == 1
    assert model.weight.eq(1).all()
    assert f"{inside}' is a symbolic link" in caplog.text
    with pytest.raises(CorruptCheckpointError, match="symbolic link"):
        savegame.load(run / step(2))
    result = cli("verify", run)
    assert result.exit_code == 1 and "symbolic link" in result.output and step(2) in result.output, result.output
    assert moved.exists(), "the data the link points to is left alone"


def test_a_fifo_in_place_of_a_tensor_file_is_refused_not_waited_on(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    file = run / step(2) / "tensors-00000.safetensors"
    file.unlink()
    os.mkfifo(file)
    done: list[int] = []
    restoring = threading.Thread(target=lambda: done.append(_restore_step(run)), daemon=True)
    restoring.start()
    restoring.join(timeout=30)  # a hang fails here; the thread then stays blocked on the FIFO
    assert done == [1]


def _restore_step(run: Path) -> int:
    with savegame.Checkpointer(run, {"model": torch.nn.Linear(2, 2)}) as ckpt:
        return ckpt.restore().step


def test_a_linked_abandoned_folder_is_not_written_into(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    elsewhere = tmp_path / "outside"
    elsewhere.mkdir()
    (run / "abandoned").symlink_to(elsewhere)
    with savegame.Checkpointer(run, {"model": torch.nn.Linear(2, 2)}, async_save=False) as ckpt:
        ckpt.restore(1)
        with pytest.raises(StorageError, match="abandoned' is a symbolic link"):
            ckpt.save(2)  # would move step 2 aside, into the linked folder
    assert list(elsewhere.iterdir()) == []
    assert (run / step(2) / "manifest.json").is_file()


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_export_replaces_only_a_regular_file(tmp_path, kind):
    run = tmp_path / "run"
    make_run(run)
    out = tmp_path / "model.pt"
    target = outside_file(tmp_path)
    if kind == "symlink":
        out.symlink_to(target)
    else:
        os.mkfifo(out)
    result = cli("export", run, "--to", out)
    assert result.exit_code == 2, result.output
    assert ("a symbolic link" if kind == "symlink" else "a FIFO") in result.output
    assert stat.S_ISLNK(os.lstat(out).st_mode) if kind == "symlink" else stat.S_ISFIFO(os.lstat(out).st_mode)
    assert target.read_bytes() == PRECIOUS
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".model.pt")] == []
    out.unlink()
    assert cli("export", run, "--to", out).exit_code == 0  # a new name is fine
    assert cli("export", run, "--to", out).exit_code == 0  # and so is a regular file there
    assert torch.load(out, weights_only=True)["weight"].eq(2).all()


def test_a_linked_leftover_goes_as_a_link_and_what_it_points_to_stays(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    elsewhere = tmp_path / "outside"
    elsewhere.mkdir()
    (elsewhere / "keep").write_bytes(PRECIOUS)
    (run / ".tmp-step-0000000003-deadbeef").symlink_to(elsewhere)
    with savegame.Checkpointer(run, {"model": torch.nn.Linear(2, 2)}):
        pass  # opening a run directory removes the leftovers of interrupted saves
    assert not os.path.lexists(run / ".tmp-step-0000000003-deadbeef")
    assert (elsewhere / "keep").read_bytes() == PRECIOUS
