"""SIGKILL during an incremental save and during the sweep of the content store.

After every kill: every listed checkpoint verifies and restores its own step's values;
the next writer carries on; and once a writer has opened the run again no pack is
left that no manifest uses (a crash leaves unreferenced data only until then).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import savegame
from savegame.engine.reader import verify_checkpoint
from savegame.run.directory import RunDir
from savegame.run.store import ContentStore
from savegame.storage import LocalStorage
from tests.integration.procs import child_env

HERE = Path(__file__).parent


def kill_at(run_dir: Path, wanted: str, nth: int) -> str:
    """Run the save loop; SIGKILL it when it announces its ``nth`` operation starting with ``wanted``."""
    proc = subprocess.Popen([sys.executable, str(HERE / "_incremental_child.py"), str(run_dir)],
                            stdout=subprocess.PIPE, text=True, env=child_env())
    assert proc.stdout is not None
    seen, how, resumed = 0, "", False
    try:
        for line in proc.stdout:
            line = line.strip()
            resumed = resumed or line.startswith("resumed")
            if resumed and line.startswith(wanted):
                seen += 1
                if seen == nth:
                    os.kill(proc.pid, signal.SIGKILL)
                    how = line
                    break
        assert proc.wait(timeout=120) == -signal.SIGKILL, "the save loop ended by itself"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return how


def check_run(run_dir: Path) -> int:
    """Every listed checkpoint verifies and holds its step's values; return the newest step."""
    storage = LocalStorage(run_dir)
    names = RunDir(storage).names()
    assert names
    for name in names:
        assert verify_checkpoint(storage, name) == [], name
        tree = savegame.load(run_dir / name)
        assert torch.all(tree["state"]["head"]["weight"] == float(tree["step"]))
    return max(savegame.load(run_dir / name)["step"] for name in names)


def no_garbage_after_reopen(run_dir: Path) -> None:
    head, backbone = torch.nn.Linear(64, 64), torch.nn.Linear(256, 512)
    ckpt = savegame.Checkpointer(run_dir, {"backbone": backbone, "head": head}, keep_last=2, incremental=True)
    ckpt.close()
    store = ContentStore(LocalStorage(run_dir))
    used = set().union(*store.referenced().values())
    assert set(store.packs()) == used


@pytest.mark.parametrize("wanted", ["op create data/", "op rename .tmp-", "op remove data/"],
                         ids=["mid-pack-write", "mid-commit", "mid-sweep"])
def test_sigkill_leaves_every_listed_checkpoint_restorable_and_no_garbage_for_long(tmp_path: Path,
                                                                                   wanted: str) -> None:
    rng = random.Random(wanted)
    run_dir = tmp_path / "run"
    newest = 0
    for _ in range(2):
        how = kill_at(run_dir, wanted, rng.randint(1, 4))
        assert how, "the child never reached the operation"
        now = check_run(run_dir)
        assert now >= newest  # nothing durable went missing
        newest = now
        no_garbage_after_reopen(run_dir)
