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
from savegame.engine.pinned import HostBuffer, pages
from savegame.engine.staging import SCRATCH, Staging, batches, copy_in_slices, gather, place
from savegame.format import layout
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


def test_batches_cut_small_entries_into_pieces_under_the_limit_in_order():
    sizes = [8, 8, 8, 16, 4, 24]
    items = [(0, 0), (1, 1), (0, 2), (0, 3), (1, 4), (1, 5)]
    assert batches(items, sizes, limit=24) == [[(0, 0), (1, 1), (0, 2)], [(0, 3), (1, 4)], [(1, 5)]]
    assert batches(items, sizes, limit=1000) == [items]
    assert batches([], sizes, limit=24) == []


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


def test_gather_copies_scattered_small_tensors_once_then_places_each_in_its_file():
    # on the CPU the same code runs synchronously; on a GPU the moves wait for the stream
    tensors = [torch.randn(3), torch.randn(300_000), torch.arange(5, dtype=torch.int16), torch.tensor(True),
               torch.randn(2, 2).double(), torch.randn(1000)]
    plan = layout.plan(tensors, 1_200_100)  # two files
    assert len(plan.files) == 2
    small = [(k, e) for k, entries in enumerate(plan.files) for e in entries if plan.sizes[e] < 100_000]
    buffers = [torch.zeros(size, dtype=torch.uint8) for size in plan.file_sizes()]
    scratch = torch.zeros(1 << 16, dtype=torch.uint8)
    moves: list[tuple[int, int, int]] = []
    gather(plan, small, buffers, scratch, 7, moves)
    assert [m[2] for m in moves] == [plan.sizes[e] for _, e in small]
    place(moves)
    for k, e in small:
        got = buffers[k][plan.start[e]:plan.start[e] + plan.sizes[e]].view(plan.dtypes[e]).view(plan.shapes[e])
        assert torch.equal(got, plan.sources[e]), e
    big = [e for e in range(len(tensors)) if plan.sizes[e] >= 100_000]
    assert all(not buffers[plan.shard[e]][plan.start[e]:plan.start[e] + plan.sizes[e]].any() for e in big)


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
    staging.buffer(2, 5000, pinned=True)
    staging.trim(2)  # a state saved in fewer files: the third buffer goes
    assert staging.pinned_bytes == pages(1_000_001) + pages(123) and len(pinner.live) == 2
    assert pages(1_000_001) + pages(123) - (1_000_001 + 123) < 2 * pages(1)  # at most a page per file over
    staging.scratch(torch.device("cpu"))  # the per-GPU scratch counts too, and goes with the rest
    assert staging.pinned_bytes == pages(1_000_001) + pages(123) + SCRATCH
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback where CUDA's runtime is not usable")
def test_without_a_usable_cuda_runtime_staging_memory_stays_unpinned_and_says_so(caplog):
    from savegame.engine.pinned import cuda_pinner

    with caplog.at_level("WARNING", logger="savegame.engine.pinned"):
        buffer = HostBuffer(10_000, cuda_pinner())
    assert buffer.pinned_bytes == 0 and "cannot page-lock" in caplog.text
    buffer.tensor.fill_(1)
    buffer.release()  # nothing registered: nothing to unregister
