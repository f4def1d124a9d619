"""A writer killed mid-checkpoint (a migrate or a save) leaves a hidden ``.tmp-step-...`` directory; the next
writer that holds the run lock (a migrate, a prune, a Checkpointer) removes it, and nothing else."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import savegame
from savegame.cli import main
from savegame.engine.offline import write_tree
from savegame.run.directory import RunDir
from savegame.storage import LocalStorage
from tests.integration.procs import child_env

CHILD = Path(__file__).with_name("_killed_writer_child.py")


def killed_writer(kind: str, run_dir: Path) -> list[str]:
    """Run the child writer until it is killed; return the leftovers it left."""
    done = subprocess.run([sys.executable, str(CHILD), kind, str(run_dir)], env=child_env(), capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == -signal.SIGKILL, done.stderr
    leftovers = sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".tmp-"))
    assert any(name.startswith(".tmp-step-0000000002-") and (run_dir / name).is_dir() for name in leftovers)
    return leftovers


def next_writer(kind: str, run_dir: Path) -> None:
    if kind == "migrate":
        tree = {"state": {"model": {"w": torch.ones(3)}}, "rng": {}, "run": {"best": {}, "early_stopping": None}}
        write_tree(run_dir, tree, step=3)
    elif kind == "prune":
        done = CliRunner().invoke(main, ["prune", str(run_dir), "--keep-last", "5"])
        assert done.exit_code == 0, done.output
    else:
        with savegame.Checkpointer(run_dir, state={"model": torch.nn.Linear(64, 64)}, async_save=False):
            pass


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One run directory per kind of killed writer (a child process each), copied by every test."""
    root = tmp_path_factory.mktemp("killed")
    for kind in ("migrate", "save"):
        killed_writer(kind, root / kind)
    return {kind: root / kind for kind in ("migrate", "save")}


@pytest.mark.parametrize("killed", ["migrate", "save"])
@pytest.mark.parametrize("after", ["migrate", "prune", "checkpointer"])
def test_the_next_writer_removes_a_killed_writers_temporary_checkpoint(
        tmp_path: Path, killed_runs: dict[str, Path], killed: str, after: str) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(killed_runs[killed], run_dir)
    names_before = RunDir(LocalStorage(str(run_dir))).names()
    assert names_before == ["step-0000000001"]

    next_writer(after, run_dir)
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".tmp-")]
    expected = [*names_before, "step-0000000003"] if after == "migrate" else names_before
    assert RunDir(LocalStorage(str(run_dir))).names() == expected  # committed checkpoints untouched
    assert savegame.load(run_dir / "step-0000000001")["step"] == 1
