"""docs/distributed.md's quick start runs as written on 2 ranks, and a second start resumes it."""

from __future__ import annotations

from pathlib import Path

import pytest

import savegame
from tests.distributed import launch

WORKER = str(Path(__file__).with_name("_quickstart.py"))


@pytest.mark.slow
def test_the_quick_start_runs_on_two_ranks_and_resumes(tmp_path):
    run_dir = str(tmp_path / "run")
    first = launch.results(launch.run(WORKER, 2, run_dir, timeout=120))
    assert [(r["rank"], r["step"], r["resumed"]) for r in first] == [(0, 8, False), (1, 8, False)]  # 2 epochs of 256/64 batches
    assert first[0]["weight"] == first[1]["weight"]  # DDP: one model
    tree = savegame.load(run_dir)
    assert tree["step"] == 8 and len(savegame.list_checkpoints(run_dir)) == 2  # one per epoch, keep_last=3
    again = launch.results(launch.run(WORKER, 2, run_dir, timeout=120))
    assert [(r["step"], r["resumed"], r["weight"]) for r in again] == [(8, True, first[0]["weight"])] * 2
