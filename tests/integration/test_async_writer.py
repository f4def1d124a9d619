"""The asynchronous writer: exit durability, back-pressure, error surfacing, snapshot consistency."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading

import pytest
import torch

import savegame
from savegame.engine.reader import verify_checkpoint
from savegame.errors import StorageError
from savegame.run.directory import RunDir
from savegame.storage import FaultyStorage, LocalStorage
from tests.integration.procs import child_env


def test_a_process_that_saves_and_exits_leaves_a_complete_checkpoint(tmp_path):
    code = (
        "import sys, torch, savegame\n"
        "m = torch.nn.Linear(1024, 1024)\n"
        "torch.nn.init.constant_(m.weight, 7.0)\n"
        "c = savegame.Checkpointer(sys.argv[1], {'m': m})\n"
        "c.save(1)\n"  # no wait(), no close(): the interpreter exits right away
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60, check=False,
                         env=child_env())
    assert out.returncode == 0, out.stderr
    storage = LocalStorage(tmp_path)
    assert RunDir(storage).names() == ["step-0000000001"]
    assert verify_checkpoint(storage, "step-0000000001") == []
    assert savegame.load(tmp_path)["state"]["m"]["weight"].eq(7.0).all()


class GatedStorage(LocalStorage):
    """Blocks the writer's first file creation until the test opens the gate."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self.gate, self.entered = threading.Event(), threading.Event()

    def create(self, path):
        if "tensors-" in path and not self.gate.is_set():
            self.entered.set()
            self.gate.wait(timeout=30)
        return super().create(path)


def test_back_pressure_one_save_in_flight(tmp_path, caplog):
    storage = GatedStorage(tmp_path)
    model = torch.nn.Linear(8, 8)
    ckpt = savegame.Checkpointer(tmp_path, {"m": model}, storage=storage)
    storage.gate.set()
    ckpt.save(1)
    ckpt.wait()
    storage.gate.clear()
    ckpt.save(2)
    assert storage.entered.wait(timeout=30)  # save 2 is in flight, held at the gate
    done = threading.Event()

    def third() -> None:
        ckpt.save(3)
        done.set()

    with caplog.at_level(logging.DEBUG, logger="savegame"):
        worker = threading.Thread(target=third)
        worker.start()
        assert not done.wait(timeout=0.2)  # save 3 waits for save 2 (back-pressure)
        storage.gate.set()
        worker.join(timeout=30)
    assert done.is_set()
    ckpt.close()
    assert "waited" in caplog.text
    assert RunDir(LocalStorage(tmp_path)).names() == ["step-0000000001", "step-0000000002", "step-0000000003"]


def test_background_failure_surfaces_at_the_next_save_and_at_close(tmp_path):
    faulty = FaultyStorage(LocalStorage(tmp_path))
    ckpt = savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(4, 4)}, storage=faulty)
    faulty.fail_at = len(faulty.ops) + 2
    ckpt.save(1)
    with pytest.raises(StorageError):
        ckpt.save(2)  # the previous save's error comes first; this save is not started
    faulty.fail_at = len(faulty.ops) + 2
    ckpt.save(3)
    with pytest.raises(StorageError):
        ckpt.close()
    assert RunDir(LocalStorage(tmp_path)).names() == []


def test_in_place_optimizer_steps_right_after_save_do_not_leak(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 256)).sum().backward()
    opt.step()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_m = opt.state_dict()["state"][0]["exp_avg"].clone()
    with savegame.Checkpointer(tmp_path, {"model": model, "opt": opt}) as ckpt:
        ckpt.save(1)
        for _ in range(3):  # mutate params and optimizer state in place while the writer runs
            model(torch.randn(4, 256)).sum().backward()
            opt.step()
    tree = savegame.load(tmp_path)
    assert all(torch.equal(tree["state"]["model"][k], v) for k, v in expected.items())
    assert torch.equal(tree["state"]["opt"]["state"][0]["exp_avg"], expected_m)


@pytest.mark.cuda
def test_cuda_snapshot_is_consistent_under_mutation(tmp_path):
    model = torch.nn.Linear(2048, 2048).cuda()
    expected = model.weight.detach().cpu().clone()
    with savegame.Checkpointer(tmp_path, {"model": model}) as ckpt:
        ckpt.save(1)
        with torch.no_grad():
            model.weight.add_(1.0)
    assert torch.equal(savegame.load(tmp_path)["state"]["model"]["weight"], expected)


def test_the_background_writer_runs_at_the_lowest_cpu_priority(tmp_path):
    import os

    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread priorities are set on Linux only")
    from savegame.engine import writer

    def priority() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    mine = priority()
    seen: list[int] = []
    background = writer.BackgroundWriter()
    background.submit(lambda: seen.append(priority()))
    background.wait()
    assert mine < writer.WRITER_NICE and seen == [writer.WRITER_NICE]
    assert priority() == mine  # only the writer thread was lowered, not the caller
