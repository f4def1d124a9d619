"""A save's bookkeeping does not grow with the run: counted in storage operations and executed lines, not time."""

from __future__ import annotations

import sys

import torch

import savegame
from savegame import policies
from savegame.format import names as n
from savegame.storage import LocalStorage


class Counting(LocalStorage):
    """Local storage that counts directory listings and manifest reads."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.listings = self.manifest_reads = 0

    def list_dir(self, path: str) -> list[str]:
        self.listings += 1
        return super().list_dir(path)

    def read_bytes(self, path: str) -> bytes:
        self.manifest_reads += path.endswith(n.MANIFEST)
        return super().read_bytes(path)


def io_of_one_save(run, count: int, **options) -> tuple[int, int]:
    """(directory listings, manifest reads) of the save after ``count`` saves, in a process that reopened the run."""
    model = torch.nn.Linear(2, 2)
    with savegame.Checkpointer(run, {"model": model}, async_save=False, best="loss", **options) as ckpt:
        for step in range(1, count + 1):
            ckpt.save(step, metrics={"loss": (step * 37 % 11) / 11})
    storage = Counting(str(run))
    with savegame.Checkpointer(run, {"model": model}, async_save=False, best="loss", storage=storage,
                               **options) as ckpt:
        ckpt.restore()
        ckpt.save(count + 1, metrics={"loss": 0.5})
        before = (storage.listings, storage.manifest_reads)
        ckpt.save(count + 2, metrics={"loss": 0.4})
        return storage.listings - before[0], storage.manifest_reads - before[1]


def test_a_save_neither_lists_the_run_directory_nor_reads_other_manifests(tmp_path):
    for options in ({}, {"keep_last": 2, "keep_every": 3}):
        small = io_of_one_save(tmp_path / f"small{len(options)}", 4, **options)
        large = io_of_one_save(tmp_path / f"large{len(options)}", 40, **options)
        assert small == large == (0, 0), options


def executed_lines(call) -> int:
    """Lines of Python executed by ``call()`` (comprehensions included): an operation count."""
    count = 0

    def trace(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return trace

    sys.settrace(trace)
    try:
        call()
    finally:
        sys.settrace(None)
    return count


def test_plan_retention_grows_linearly_with_the_records():
    def records(count: int) -> list[policies.CheckpointRecord]:
        # Every step saved twice (the older save superseded), metrics everywhere.
        return [policies.CheckpointRecord(step=i // 2, name=f"c{i}", time=float(i),
                                          metrics={"loss": (i * 7919 % 997) / 997}) for i in range(count)]

    chosen = [policies.keep_last(3), policies.keep_every(10), policies.keep_best("loss", "min", 2)]
    small, large = (executed_lines(lambda c=c: policies.plan_retention(records(c), chosen, protected={"c1"}))
                    for c in (500, 4000))
    # 8 times the records: a linear (or n log n) plan does about 8-10 times the work, a quadratic one 64 times.
    assert large / small < 14, (small, large)
    no_policy = [executed_lines(lambda c=c: policies.plan_retention(records(c), [])) for c in (500, 4000)]
    assert no_policy[1] / no_policy[0] < 14, no_policy


def lines_of_one_save(run, count: int, **options) -> int:
    """Python lines executed by one save (and its bookkeeping) after ``count`` saves in this process."""
    model = torch.nn.Linear(2, 2)
    with savegame.Checkpointer(run, {"model": model}, async_save=False, best="loss", **options) as ckpt:
        for step in range(1, count + 1):
            ckpt.save(step, metrics={"loss": (step * 37 % 11) / 11}, pin=step == 3)
        return executed_lines(lambda: ckpt.save(count + 1, metrics={"loss": 0.5}))


def test_the_bookkeeping_of_a_save_does_not_grow_with_the_run(tmp_path):
    for options in ({}, {"keep_last": 2, "keep_every": 3}, {"keep_last": 3}):
        small = lines_of_one_save(tmp_path / f"small{len(options)}", 10, **options)
        large = lines_of_one_save(tmp_path / f"large{len(options)}", 150, **options)
        assert large < small * 1.2, (options, small, large)  # 15 times the checkpoints, the same work
