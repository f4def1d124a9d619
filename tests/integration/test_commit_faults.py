"""A crash or an error at every storage operation of a save leaves no readable partial checkpoint."""

from __future__ import annotations

import errno
import os

import pytest
import torch

import savegame
from savegame.engine.reader import verify_checkpoint
from savegame.errors import StorageError
from savegame.run.directory import RunDir
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
        ckpt.restore()  # the same run, continued
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


@pytest.mark.parametrize("async_save", [False, True])
def test_a_save_makes_files_durable_then_the_directory_then_renames_then_syncs_the_run_dir(tmp_path, async_save):
    # A crash can only leave old-or-complete if every byte is on disk before the name appears.
    faulty = FaultyStorage(LocalStorage(tmp_path))
    with savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(64, 64)}, storage=faulty,
                               async_save=async_save, shard_bytes=4096) as ckpt:
        start = len(faulty.ops)
        ckpt.save(1)
        ckpt.wait()
        ops = faulty.ops[start:]
    rename = next(i for i, (op, path) in enumerate(ops) if op == "rename" and path.startswith(".tmp-step-"))
    tmp = ops[rename][1]
    files = {path for op, path in ops[:rename] if op == "create" and path.startswith(tmp + "/")}
    assert len(files) >= 3  # shard_bytes made several tensor files, plus the manifest
    closed = [i for i, (op, path) in enumerate(ops) if op == "close" and path in files]
    dir_synced = ops.index(("fsync_dir", tmp))
    assert len(closed) == len(files) and max(closed) < dir_synced < rename  # close() = fsync, see below
    assert ("fsync_dir", "") in ops[rename + 1:]
    first_run_dir_sync = ops.index(("fsync_dir", ""), rename)
    assert all(op != "create" or path.startswith(".tmp-") for op, path in ops[rename:first_run_dir_sync])


def test_local_storage_fsyncs_every_file_it_closes_and_every_directory_it_syncs(tmp_path, monkeypatch):
    if not os.path.exists("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to name the synced descriptors (Linux)")
    synced: list[str] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    with savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(8, 8)}, async_save=False) as ckpt:
        path = ckpt.save(1)
    tmp_dirs = [s for s in synced if os.path.basename(s).startswith(".tmp-step-0000000001")]
    assert tmp_dirs, synced  # the checkpoint directory, before its rename
    for name in os.listdir(path):
        assert os.path.join(tmp_dirs[0], name) in synced, name  # each file, while still under the temporary name
    assert str(tmp_path) in synced[synced.index(tmp_dirs[0]):]  # the run directory, after the rename
