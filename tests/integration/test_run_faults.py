"""A run directory survives kills, full disks, bit rot and crashes during retention."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import savegame
from savegame.reader import verify_checkpoint
from savegame.run_dir import RunDir
from savegame.storage import FaultyStorage, InjectedFault, LocalStorage
from tests.integration.procs import ROOT, child_env, run

HERE = Path(__file__).parent


def listed(run_dir: Path) -> list[str]:
    return RunDir(LocalStorage(run_dir)).names()


def check_run_dir(run_dir: Path) -> int:
    """Every listed checkpoint verifies; restore gives the newest with exactly its content."""
    storage = LocalStorage(run_dir)
    names = listed(run_dir)
    assert names, "a completed save must survive"
    for name in names:
        assert verify_checkpoint(storage, name) == [], name
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.Linear(1024, 256))
    with savegame.Checkpointer(run_dir, {"model": model}) as ckpt:
        info = ckpt.restore()
    newest = max(int(name[5:15]) for name in names)
    assert info.step == newest
    assert all(p.eq(float(newest)).all() for p in model.parameters())
    return newest


def test_sigkill_at_random_moments_of_a_save_loop(tmp_path):
    rng = random.Random(20261123)
    run_dir = tmp_path / "run"
    last = 0
    for kill in range(8):
        target = f"step {last + rng.randint(1, 6)}"
        code = run(HERE / "_save_loop_child.py", str(run_dir), "400", kill_on=target)
        assert code == -signal.SIGKILL, kill
        last = check_run_dir(run_dir)
    assert run(HERE / "_save_loop_child.py", str(run_dir), str(last + 3)) == 0
    assert check_run_dir(run_dir) == last + 3


def test_file_size_limit_during_a_save_is_a_clear_error_and_loses_nothing(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, str(HERE / "_fsize_child.py"), str(run_dir)], capture_output=True,
                         text=True, timeout=120, env=child_env())
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stderr
    assert lines[0] == "ok 1" and lines[-1] == "ok 3"
    assert lines[1].startswith("error StorageError:") and "file size limit" in lines[1]
    assert listed(run_dir) == ["step-0000000001", "step-0000000003"]
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".tmp-")]
    for name in listed(run_dir):
        assert verify_checkpoint(LocalStorage(run_dir), name) == []


def test_crash_during_retention_deletes_nothing_that_should_stay(tmp_path):
    def prepare(run_dir: Path) -> None:
        with savegame.Checkpointer(run_dir, {"m": torch.nn.Linear(4, 4)}, async_save=False) as ckpt:
            for step in (1, 2, 3):
                ckpt.save(step)

    probe = tmp_path / "probe"
    prepare(probe)
    faulty = FaultyStorage(LocalStorage(probe))
    with savegame.Checkpointer(probe, {"m": torch.nn.Linear(4, 4)}, storage=faulty, keep_last=2,
                               async_save=False) as ckpt:
        start = len(faulty.ops)
        ckpt.save(4)
        total = len(faulty.ops) - start
    assert listed(probe) == ["step-0000000003", "step-0000000004"]
    for op in range(total):
        run_dir = tmp_path / f"run{op}"
        prepare(run_dir)
        faulty = FaultyStorage(LocalStorage(run_dir), crash=True)
        ckpt = savegame.Checkpointer(run_dir, {"m": torch.nn.Linear(4, 4)}, storage=faulty, keep_last=2,
                                     async_save=False)
        faulty.fail_at = len(faulty.ops) + op
        with pytest.raises(InjectedFault):
            ckpt.save(4)
        ckpt._lock.release()
        names = listed(run_dir)
        assert "step-0000000003" in names, (op, names)
        assert set(names) <= {f"step-000000000{i}" for i in (1, 2, 3, 4)}
        for name in names:
            assert verify_checkpoint(LocalStorage(run_dir), name) == [], (op, name)


def corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) * 2 // 3] ^= 0x10
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(bytes(data[: len(data) // 2]))


@pytest.mark.parametrize("how", ["flip", "truncate"])
@pytest.mark.parametrize("target", ["manifest.json", "tensors-00000.safetensors"])
def test_damage_is_caught_by_verify_and_restore_falls_back(tmp_path, target, how, caplog):
    model = torch.nn.Linear(64, 64)
    with savegame.Checkpointer(tmp_path, {"model": model}, async_save=False) as ckpt:
        for step in (1, 2):
            with torch.no_grad():
                model.weight.fill_(step)
            ckpt.save(step)
    corrupt(tmp_path / "step-0000000002" / target, how)
    problems = verify_checkpoint(LocalStorage(tmp_path), "step-0000000002")
    assert problems and "step-0000000002" in problems[0]
    assert verify_checkpoint(LocalStorage(tmp_path), "step-0000000001") == []
    with savegame.Checkpointer(tmp_path, {"model": model}) as ckpt:
        info = ckpt.restore()
    assert info.step == 1 and model.weight.eq(1.0).all()
    assert "skipping damaged checkpoint step-0000000002" in caplog.text or "skipping checkpoint step-0000000002" in caplog.text


def test_damaged_alias_file_is_only_a_hint(tmp_path):
    with savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(2, 2)}, best={"loss": "min"}, async_save=False) as c:
        c.save(1, metrics={"loss": 0.1})
        c.save(2, metrics={"loss": 0.5})
    (tmp_path / "best.alias.json").write_bytes(b"\x00garbage")
    (tmp_path / "latest.alias.json").write_text('{"target": "step-0000000099"}')
    with savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(2, 2)}, best={"loss": "min"}) as c:
        assert c.restore("best").step == 1
        assert c.restore().step == 2


def test_two_processes_on_one_run_dir(tmp_path):
    code = (
        "import sys, torch, savegame\n"
        "from savegame.errors import RunLockedError\n"
        "try:\n"
        "    savegame.Checkpointer(sys.argv[1], {'m': torch.nn.Linear(1, 1)})\n"
        "except RunLockedError as e:\n"
        "    print('locked:', e)\n"
    )
    with savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(1, 1)}):
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                             timeout=60, env=child_env())
    assert out.stdout.startswith("locked: another process is writing"), out.stderr
