"""The device-independent logic of staging, checked on the CPU.

Which entries are gathered into one transfer, the slice-by-slice copy of a
non-contiguous tensor, the gather itself, page-locked byte accounting (with the
registration faked through the ``Pinner`` seam), and that a staged save lets go
of the live tensors. The GPU side of the same code is in test_cuda_paths.py.
"""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch

import savegame
from savegame.format import layout
from savegame.pinned import HostBuffer, pages
from savegame.staging import Staging, _gather, copy_in_slices, runs
from savegame.storage.faulty import FaultyStorage
from savegame.storage.local import LocalStorage


class FakePinner:
    """Records registrations instead of calling cudaHostRegister."""

    def __init__(self, refuse: bool = False) -> None:
        self.live: dict[int, int] = {}
        self.refuse = refuse

    def register(self, address: int, nbytes: int) -> bool:
        assert address % pages(1) == 0, "registered memory must start on a page"
        assert not any(a <= address < a + n for a, n in self.live.items()), "overlapping registration"
        if self.refuse:
            return False
        self.live[address] = nbytes
        return True

    def unregister(self, address: int) -> None:
        del self.live[address]


def test_runs_gather_only_adjacent_gatherable_entries_of_one_file_within_the_limit():
    #          e: 0   1   2   3   4   5   6   7
    starts = [0, 8, 16, 0, 8, 100, 200, 216]
    sizes = [8, 8, 8, 8, 0, 8, 16, 16]
    items = [(0, 0), (0, 1), (0, 2), (1, 3), (1, 4), (1, 5), (1, 6), (1, 7)]
    out = runs(items, lambda e: e != 2, starts, sizes, limit=24)
    assert out == [
        [(0, 0), (0, 1)],  # back to back
        [(0, 2)],  # not gatherable: alone
        [(1, 3)],  # another file starts a new run; the empty entry 4 is left out; 5 is not adjacent to 3
        [(1, 5)],
        [(1, 6)],  # 6 + 7 = 32 bytes > limit
        [(1, 7)],
    ]
    assert runs(items[:2], lambda e: True, starts, sizes, limit=16) == [[(0, 0), (0, 1)]]
    assert runs([], lambda e: True, starts, sizes, limit=16) == []


@pytest.mark.parametrize("make", [
    lambda: torch.arange(4 * 6 * 5, dtype=torch.float32).reshape(4, 6, 5).transpose(0, 2),
    lambda: torch.arange(64 * 3, dtype=torch.int64).reshape(64, 3)[::2],
    lambda: torch.arange(10, dtype=torch.float64)[::3],
    lambda: torch.arange(4 * 4, dtype=torch.float16).reshape(4, 4).t(),
])
@pytest.mark.parametrize("limit", [1, 7, 40, 1 << 20])
def test_copy_in_slices_copies_every_element_whatever_the_limit(make, limit):
    src = make()
    assert not src.is_contiguous()
    dst = torch.full(src.shape, -1, dtype=src.dtype)
    copy_in_slices(dst, src, limit)
    assert torch.equal(dst, src)


def test_copy_in_slices_never_copies_more_than_the_limit_at_once():
    src = torch.arange(8 * 16, dtype=torch.float32).reshape(16, 8).t()  # rows of 64 bytes, not contiguous
    seen: list[int] = []

    class Recording(torch.Tensor):
        def copy_(self, other, non_blocking=False):  # type: ignore[override]
            seen.append(other.nbytes)
            return super().copy_(other, non_blocking=non_blocking)

    dst = torch.empty(src.shape, dtype=src.dtype).as_subclass(Recording)
    copy_in_slices(dst, src, 128)
    assert max(seen) <= 128 and sum(seen) == src.nbytes
    assert torch.equal(dst.as_subclass(torch.Tensor), src)


def test_gather_puts_the_bytes_of_several_tensors_back_to_back():
    tensors = [torch.randn(3), torch.arange(5, dtype=torch.int16), torch.tensor(True), torch.randn(2, 2).double()]
    plan = layout.plan(tensors, 1 << 30)
    order = plan.files[0]
    buf = torch.zeros(plan.nbytes, dtype=torch.uint8)
    _gather(plan, order, buf)
    for e in order:
        got = buf[plan.start[e]:plan.start[e] + plan.sizes[e]].view(plan.dtypes[e]).view(plan.shapes[e])
        assert torch.equal(got, plan.sources[e]), e


def test_pinned_bytes_follow_the_state_reuse_buffers_by_identity_and_go_on_release():
    pinner = FakePinner()
    staging = Staging(pinner)
    first = staging.buffer(0, 5000, pinned=True)
    assert staging.buffer(0, 4000, pinned=True) is first  # reused, not reallocated
    assert staging.pinned_bytes == pages(5000) and sum(pinner.live.values()) == 5000
    for size in (10_000, 300_000, 1_000_001):  # a growing state: the old buffer is unregistered at once
        grown = staging.buffer(0, size, pinned=True)
        assert grown is not first and grown.numel() == size
        assert staging.pinned_bytes == pages(size) and list(pinner.live.values()) == [size]
        first = grown
    staging.buffer(1, 123, pinned=True)
    assert staging.pinned_bytes == pages(1_000_001) + pages(123)
    assert pages(1_000_001) + pages(123) - (1_000_001 + 123) < 2 * pages(1)  # at most a page per file over
    staging.release()
    assert staging.pinned_bytes == 0 and pinner.live == {} and staging.nbytes == 0


def test_a_buffer_that_cannot_be_pinned_still_works_and_counts_nothing():
    pinner = FakePinner(refuse=True)
    staging = Staging(pinner)
    buf = staging.buffer(0, 100, pinned=True)
    buf.fill_(3)
    assert staging.pinned_bytes == 0 and staging.buffer(0, 100, pinned=True) is buf  # not retried every save


def test_an_unreleased_host_buffer_is_unregistered_when_collected():
    pinner = FakePinner()
    buffer = HostBuffer(4096 * 3, pinner)
    assert len(pinner.live) == 1
    del buffer
    gc.collect()
    assert pinner.live == {}


def test_unpinned_buffers_are_plain_tensors_as_before():
    staging = Staging(FakePinner())
    buf = staging.buffer(0, 100, pinned=False)
    assert buf.numel() == 100 and staging.pinned_bytes == 0
    assert staging.buffer(0, 100, pinned=True) is not buf  # switching kind reallocates


def test_close_releases_the_staging_buffers(tmp_path):
    model = torch.nn.Linear(64, 64)
    ckpt = savegame.Checkpointer(tmp_path, {"model": model})
    ckpt.save(1)
    staging = ckpt._staging
    assert staging is not None and staging.nbytes > 0
    ckpt.close()
    assert staging.nbytes == 0


def test_a_staged_save_does_not_keep_the_live_tensors_until_the_write_ends(tmp_path):
    gate = threading.Event()
    made: list[weakref.ref[torch.Tensor]] = []

    class Ema:  # a state_dict() that makes its tensors fresh, as an EMA copy or a cast does
        def state_dict(self) -> dict:
            fresh = torch.full((1000,), 7.0)
            made.append(weakref.ref(fresh))
            return {"shadow": fresh}

        def load_state_dict(self, state: dict) -> None:
            pass

    def hold_the_write(op: str, path: str) -> bool:
        if op == "create" and path.endswith(".safetensors"):
            assert gate.wait(60), "the test never released the writer"
        return False

    storage = FaultyStorage(LocalStorage(str(tmp_path)), fail_if=hold_the_write)
    with savegame.Checkpointer(tmp_path, {"ema": Ema()}, storage=storage) as ckpt:
        ckpt.save(1)
        gc.collect()
        freed = made[0]() is None  # the write has not started: it is held at its first file
        gate.set()
        ckpt.wait()
    assert freed, "the background job still held the tensor state_dict() created"
    assert torch.equal(savegame.load(tmp_path)["state"]["ema"]["shadow"], torch.full((1000,), 7.0))
