"""A save in flight leaves the training process's garbage collector alone.

The background write is held in the middle (the storage blocks on an Event the test
controls), and meanwhile the training thread checks that the cyclic collector is
enabled and actually collects the cycles it makes.
"""

from __future__ import annotations

import gc
import threading

import torch

import savegame
from savegame.storage import FaultyStorage, LocalStorage


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_the_collector_runs_in_the_training_thread_while_a_save_is_in_flight(tmp_path):
    writing, release = threading.Event(), threading.Event()

    def hold(op: str, path: str) -> bool:
        if op == "create" and path.endswith(".safetensors"):
            writing.set()
            release.wait(30)
        return False  # never fail: only hold the write

    collections = []

    def count(phase: str, info: dict) -> None:
        if phase == "start":
            collections.append(info["generation"])

    state = {"model": torch.nn.Linear(8, 8), "params": torch.nn.ParameterDict(
        {f"p{k}": torch.nn.Parameter(torch.zeros(2)) for k in range(2000)})}
    assert gc.isenabled()
    ckpt = savegame.Checkpointer(tmp_path, state, storage=FaultyStorage(LocalStorage(tmp_path), fail_if=hold))
    try:
        ckpt.save(1)
        assert writing.wait(30), "the background write did not start"
        gc.callbacks.append(count)
        try:
            enabled = gc.isenabled()
            for _ in range(20_000):  # cyclic garbage, as a training step makes it
                Cycle()
        finally:
            gc.callbacks.remove(count)
        assert enabled, "the collector was disabled while the save was in flight"
        assert collections, "no automatic collection ran while the save was in flight"
    finally:
        release.set()
        ckpt.close()
    assert gc.isenabled()
    with savegame.Checkpointer(tmp_path, {"model": torch.nn.Linear(8, 8)}) as again:
        assert again.restore(strict=False).step == 1


def test_pauses_asked_for_in_the_background_writer_leave_the_collector_on():
    """Whatever the writer thread calls (retention reading manifests ...) cannot switch the collector off."""
    from savegame.engine import gcpause
    from savegame.engine.writer import BackgroundWriter

    def inside_a_pause() -> None:
        with gcpause.paused():
            seen.append(gc.isenabled())

    seen: list[bool] = []
    writer = BackgroundWriter()
    writer.submit(inside_a_pause)
    writer.wait()
    assert seen == [True]
    with gcpause.paused():  # the caller's thread still pauses, and the pause ends
        assert not gc.isenabled()
    assert gc.isenabled()
