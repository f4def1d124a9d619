"""A crash or an error at every storage operation of a save leaves no readable partial checkpoint."""

from __future__ import annotations

import errno

import pytest
import torch

import savegame
from savegame.errors import StorageError
from savegame.reader import verify_checkpoint
from savegame.run_dir import RunDir
from savegame.storage import FaultyStorage, InjectedFault, LocalStorage


def count_ops(tmp_path) -> int:
    probe = FaultyStorage(LocalStorage(tmp_path / "probe"))
    with savegame.Checkpointer(tmp_path / "probe", {"m": torch.nn.Linear(8, 8)}, storage=probe,
                               async_save=False) as ckpt:
        ckpt.save(1)
        start = len(probe.ops)
        ckpt.save(2)
        return len(probe.ops) - start


def test_save_touches_enough_operations_to_be_worth_testing(tmp_path):
    assert count_ops(tmp_path) >= 8


@pytest.mark.parametrize("crash", [True, False], ids=["crash", "error"])
def test_fault_at_every_operation_of_a_save(tmp_path, crash):
    total = count_ops(tmp_path)
    for op in range(total):
        run = tmp_path / f"run{op}"
        model = torch.nn.Linear(8, 8)
        with savegame.Checkpointer(run, {"m": model}, async_save=False) as ckpt:
            ckpt.save(1)
        first = model.weight.detach().clone()
        faulty = FaultyStorage(LocalStorage(run), crash=crash, errno_=errno.ENOSPC)
        ckpt = savegame.Checkpointer(run, {"m": model}, storage=faulty, async_save=False)
        faulty.fail_at = len(faulty.ops) + op
        with torch.no_grad():
            model.weight.add_(1.0)
        try:
            ckpt.save(2)
        except (InjectedFault, StorageError):
            pass
        else:  # a fault after the commit (aliases, history, retention) leaves the save complete
            assert not crash and "step-0000000002" in RunDir(LocalStorage(run)).names(), op
        ckpt._lock.release()  # the "dead" process's lock goes with it
        storage = LocalStorage(run)
        names = RunDir(storage).names()
        assert all(verify_checkpoint(storage, name) == [] for name in names), (op, names)
        # The old checkpoint is untouched; the new one is either absent or complete.
        assert "step-0000000001" in names
        fresh = torch.nn.Linear(8, 8)
        with savegame.Checkpointer(run, {"m": fresh}) as again:
            info = again.restore()
            if info.step == 1:
                assert torch.equal(fresh.weight, first)
            else:
                assert torch.equal(fresh.weight, first + 1.0)
            again.save(3)  # the next process carries on in the same directory
        leftovers = [p.name for p in run.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
        assert leftovers == [], (op, leftovers)
