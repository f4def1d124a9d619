"""CUDA paths: staging from every device, page-locked memory, restores onto the GPU, RNG.

These run on a machine with a CUDA device and skip, with the reason printed, elsewhere.
Each test says in a comment why the code before issue 14 fails it (or that it is a
regression guard). The device-independent halves are tested on the CPU in
test_staging_logic.py and test_restore_placement.py.
"""

from __future__ import annotations

import logging

import pytest
import torch

import savegame
from savegame.engine import rng
from savegame.engine.pinned import pages
from savegame.engine.staging import CHUNK, SCRATCH
from savegame.errors import CorruptCheckpointError

pytestmark = pytest.mark.cuda

DELAY = 1_000_000_000  # cycles of torch.cuda._sleep: ~0.5 s of device time, far longer than save() takes
MIB = 1 << 20


def two_gpus() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA devices; {torch.cuda.device_count()} visible")


class Holder:
    """A Stateful holding tensors as they are (no copies), like a model's state_dict."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            self.tensors[key].copy_(value)


def mixed(device: str | torch.device) -> dict[str, torch.Tensor]:
    """float64 tensors (first in the file, before the uint8 RNG states): big, small (gathered), strided."""
    big = torch.zeros(4 * MIB // 8, dtype=torch.float64, device=device)
    smalls = {f"s{i}": torch.zeros(7 + i, dtype=torch.float64, device=device) for i in range(50)}
    strided = torch.zeros(512, 1024, dtype=torch.float64, device=device).t()
    return {"big": big, "strided": strided, **smalls}


def user_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.nbytes for t in tensors.values())


def staged_float64(ckpt: savegame.Checkpointer, nbytes: int) -> torch.Tensor:
    buffers = ckpt._staging._buffers  # type: ignore[union-attr]
    return buffers[0][:nbytes].view(torch.float64)


def test_a_delayed_producer_on_a_user_stream_is_in_the_staging_buffer_when_save_returns(tmp_path):
    # Regression guard (one device): the old code's side stream waited for the current stream too.
    # It covers the new gathered and sliced copies, which must stay ordered after the producer.
    tensors = mixed("cuda")
    with savegame.Checkpointer(tmp_path, {"h": Holder(tensors)}) as ckpt:
        ckpt.save(0)
        ckpt.wait()  # the staging buffers exist and hold zeros
        user = torch.cuda.Stream()
        user.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(user):
            torch.cuda._sleep(DELAY)
            for t in tensors.values():
                t.fill_(3.0)
            ckpt.save(1)  # no synchronisation anywhere before this
            staged = staged_float64(ckpt, user_bytes(tensors)).clone()  # right after save() returned
        assert bool((staged == 3.0).all()), "save() returned before the producer's writes were copied"
    tree = savegame.load(tmp_path)
    assert all(bool((v == 3.0).all()) for v in tree["state"]["h"].values())


def test_a_source_on_another_device_is_copied_before_save_returns(tmp_path):
    # Old code: one side stream on the current device (cuda:0); the copy of a cuda:1 tensor ran
    # asynchronously on cuda:1's current stream, after the sleep, and nothing waited for it: the
    # staging buffer still held zeros when save() returned (the DDP rank without set_device).
    two_gpus()
    with torch.cuda.device(1):
        tensors = mixed("cuda:1")
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0
    with savegame.Checkpointer(tmp_path, {"h": Holder(tensors)}) as ckpt:
        ckpt.save(0)
        ckpt.wait()
        with torch.cuda.device(1):  # queue the delayed producer on cuda:1's current stream
            torch.cuda._sleep(DELAY)
            for t in tensors.values():
                t.fill_(5.0)
        assert torch.cuda.current_device() == 0
        ckpt.save(1)
        staged = staged_float64(ckpt, user_bytes(tensors)).clone()
    assert bool((staged == 5.0).all()), "the cuda:1 copies were not waited for"
    assert all(bool((v == 5.0).all()) for v in savegame.load(tmp_path)["state"]["h"].values())


def test_a_state_on_two_devices_is_captured_whole(tmp_path):
    # Old code: only cuda:0's side stream was synchronised; the cuda:1 half was stale.
    two_gpus()
    first = {"a": torch.zeros(MIB, dtype=torch.float64, device="cuda:0")}
    second = {"b": torch.zeros(MIB, dtype=torch.float64, device="cuda:1")}
    with savegame.Checkpointer(tmp_path, {"x": Holder(first), "y": Holder(second)}) as ckpt:
        ckpt.save(0)
        ckpt.wait()
        for device, t in ((0, first["a"]), (1, second["b"])):
            with torch.cuda.device(device):
                torch.cuda._sleep(DELAY)
                t.fill_(device + 7.0)
        ckpt.save(1)
        staged = staged_float64(ckpt, 2 * MIB * 8).clone()
    assert sorted(set(staged.tolist())) == [7.0, 8.0]
    tree = savegame.load(tmp_path)["state"]
    assert bool((tree["x"]["a"] == 7.0).all()) and bool((tree["y"]["b"] == 8.0).all())


def test_staging_is_page_locked_outside_the_caching_allocator_reused_and_released(tmp_path):
    # Old code: buffers came from the caching host allocator (pinned bytes rounded up to powers
    # of two, a grown buffer's old block kept, nothing released by close()); Staging had no
    # pinned_bytes, and the caching allocator's pinned bytes grew with every new size.
    tensors = {"w": torch.zeros(MIB, dtype=torch.uint8, device="cuda")}
    holder = Holder(tensors)
    cached = getattr(torch.cuda, "host_memory_stats", None)  # torch >= 2.5: the caching host allocator's bytes
    cached_before = cached().get("allocated_bytes.current", 0) if cached else None
    ckpt = savegame.Checkpointer(tmp_path, {"h": holder})
    try:
        for step, size in enumerate((MIB, 3 * MIB + 5, 7 * MIB + 11)):
            tensors["w"] = torch.full((size,), step, dtype=torch.uint8, device="cuda")
            ckpt.save(step)
            ckpt.wait()
            staging = ckpt._staging
            assert staging is not None
            buffers = dict(staging._buffers)
            assert all(b.is_pinned() for b in buffers.values())
            file_bytes = sum(b.numel() for b in buffers.values())
            scratch = SCRATCH * len(staging._scratch)  # 16 MiB per GPU holding tensors under 1 MiB
            assert len(staging._scratch) <= 1
            assert staging.pinned_bytes == sum(pages(b.numel()) for b in buffers.values()) + scratch
            assert staging.pinned_bytes - scratch - file_bytes < len(buffers) * pages(1)  # + < a page per file
            ckpt.save(100 + step)  # the same state again: the very same buffers
            ckpt.wait()
            assert all(staging._buffers[k] is b for k, b in buffers.items())
        if cached:
            assert cached().get("allocated_bytes.current", 0) == cached_before, "staging used the caching host allocator"
        last = list(staging._buffers.values())
    finally:
        ckpt.close()
    assert staging.pinned_bytes == 0
    assert not any(b.is_pinned() for b in last), "close() must unregister the staging memory"


def test_a_non_contiguous_gpu_tensor_is_saved_without_a_full_size_temporary(tmp_path):
    # Old code: copy_ of a strided CUDA tensor into the host buffer made a contiguous device
    # temporary of the whole tensor (64 MiB here); now at most CHUNK bytes at a time.
    base = torch.randn(4096, 4096, device="cuda")
    strided = base.t()
    expected = strided.cpu()
    with savegame.Checkpointer(tmp_path, {"h": Holder({"t": strided})}) as ckpt:
        ckpt.save(0)  # staging allocated; GPU temporaries of this save are measured below
        ckpt.wait()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        ckpt.save(1)
        extra = torch.cuda.max_memory_allocated() - before
    assert extra <= CHUNK + SCRATCH, f"save() used {extra} bytes of GPU temporaries for a strided tensor"
    got = savegame.load(tmp_path)["state"]["h"]["t"]
    assert torch.equal(got, expected)


def test_many_small_gpu_tensors_of_every_dtype_round_trip_exactly(tmp_path):
    # Regression guard for the gathered copy (item 6): bytes of every small tensor, any dtype.
    torch.manual_seed(0)
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int64, torch.bool,
              torch.uint8, torch.complex64]
    state = {}
    for i in range(300):
        dtype = dtypes[i % len(dtypes)]
        raw = torch.randint(0, 256, (i % 13 + 1, dtype.itemsize), dtype=torch.uint8)
        state[f"t{i}"] = raw.view(dtype).reshape(-1).cuda()
    state["scalar"] = torch.tensor(2.5, device="cuda")
    state["empty"] = torch.empty(0, 3, device="cuda")
    with savegame.Checkpointer(tmp_path, {"h": Holder(state)}) as ckpt:
        ckpt.save(1)
    tree = savegame.load(tmp_path)["state"]["h"]
    for key, value in state.items():
        assert tree[key].dtype == value.dtype and tree[key].shape == value.shape, key
        if value.numel():
            assert torch.equal(tree[key].view(torch.uint8), value.cpu().view(torch.uint8)), key


def test_tied_and_strided_gpu_tensors_restore_onto_the_gpu_with_their_values(tmp_path):
    w = torch.randn(64, 32, device="cuda")
    state = {"w": w, "wt": w.t(), "tied": w, "cols": torch.randn(300, 40, device="cuda")[:, ::3]}
    expected = {k: v.cpu() for k, v in state.items()}
    with savegame.Checkpointer(tmp_path, {"h": Holder(state)}) as ckpt:
        ckpt.save(1)
    tree = savegame.load(tmp_path, map_location="cuda")["state"]["h"]
    for key, value in expected.items():
        assert tree[key].is_cuda and torch.equal(tree[key].cpu(), value), key
    assert tree["tied"].data_ptr() == tree["w"].data_ptr() and tree["wt"].data_ptr() == tree["w"].data_ptr()


def _trained_adam(device: str = "cuda") -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)]).to(device)
    opt = torch.optim.Adam(model.parameters())
    for _ in range(2):
        model(torch.randn(8, 1024, device=device)).sum().backward()
        opt.step()
    return model, opt


def assert_same_optimizer_state(restored: torch.optim.Optimizer, original: torch.optim.Optimizer) -> None:
    mine, theirs = restored.state_dict()["state"], original.state_dict()["state"]
    assert mine.keys() == theirs.keys()
    for index, moments in theirs.items():
        assert mine[index].keys() == moments.keys()
        for key, value in moments.items():
            got = mine[index][key]
            assert got.device == value.device, (index, key, got.device, value.device)
            assert torch.equal(got, value), (index, key)


def test_restore_with_map_location_cuda_keeps_one_copy_and_adam_step_on_the_cpu(tmp_path):
    # Old code: every entry was moved to the GPU, then load_state_dict copied the model's again
    # (peak = moments + the whole model once more), and Adam's CPU `step` went to the GPU.
    model, opt = _trained_adam()
    with savegame.Checkpointer(tmp_path, {"model": model, "opt": opt}) as ckpt:
        ckpt.save(1)
    fresh = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)]).cuda()
    fresh_opt = torch.optim.Adam(fresh.parameters())
    params = {id(p): p.data_ptr() for p in fresh.parameters()}
    moments = 2 * sum(p.nbytes for p in model.parameters())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with savegame.Checkpointer(tmp_path, {"model": fresh, "opt": fresh_opt}) as ckpt:
        ckpt.restore(map_location="cuda")
    peak = torch.cuda.max_memory_allocated() - before
    assert peak <= moments + 2 * MIB, f"restore used {peak} bytes of GPU memory; the new state is {moments}"
    assert all(p.data_ptr() == params[id(p)] for p in fresh.parameters())  # read into the parameters
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert_same_optimizer_state(fresh_opt, opt)  # every moment by value; `step` on the CPU like the original
    assert all(s["step"].is_cpu for s in fresh_opt.state.values())


@pytest.mark.parametrize("map_location", [None, "cuda", "cpu"])
def test_a_gpu_model_and_optimizer_restore_exactly(tmp_path, map_location):
    model, opt = _trained_adam()
    with savegame.Checkpointer(tmp_path, {"model": model, "opt": opt}) as ckpt:
        ckpt.save(1)
    fresh = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)]).cuda()
    fresh_opt = torch.optim.Adam(fresh.parameters())
    with savegame.Checkpointer(tmp_path, {"model": fresh, "opt": fresh_opt}) as ckpt:
        ckpt.restore(map_location=map_location)
    for key, value in model.state_dict().items():
        assert fresh.state_dict()[key].is_cuda and torch.equal(fresh.state_dict()[key], value), key
    assert_same_optimizer_state(fresh_opt, opt)
    x = torch.randn(8, 1024, device="cuda")
    for m, o in ((model, opt), (fresh, fresh_opt)):
        m(x).sum().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True))


def test_a_damaged_checkpoint_bound_for_the_gpu_is_refused(tmp_path):
    model = torch.nn.Linear(2048, 2048).cuda()
    with savegame.Checkpointer(tmp_path, {"model": model}) as ckpt:
        ckpt.save(1)
    data = next(tmp_path.glob("step-*/tensors-*.safetensors"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside the 16 MiB weight, streamed through the page-locked slots
    data.write_bytes(bytes(raw))
    fresh = torch.nn.Linear(2048, 2048).cuda()
    with savegame.Checkpointer(tmp_path, {"model": fresh}) as ckpt, \
            pytest.raises(CorruptCheckpointError, match="checksum"):
        ckpt.restore(1)


def test_a_cpu_checkpoint_restores_into_a_gpu_model_and_back(tmp_path):
    cpu_model = torch.nn.Linear(16, 16)
    with savegame.Checkpointer(tmp_path, {"model": cpu_model}) as ckpt:
        ckpt.save(1)
    gpu_model = torch.nn.Linear(16, 16).cuda()
    with savegame.Checkpointer(tmp_path, {"model": gpu_model}) as ckpt:
        ckpt.restore()
    assert torch.equal(gpu_model.weight.cpu(), cpu_model.weight.detach())
    tree = savegame.load(tmp_path, map_location="cuda:0")
    assert tree["state"]["model"]["weight"].is_cuda
    assert torch.equal(tree["state"]["model"]["weight"].cpu(), cpu_model.weight.detach())


def test_a_meta_model_is_assigned_the_checkpoint_on_the_gpu(tmp_path):
    source = torch.nn.Linear(32, 32)
    with savegame.Checkpointer(tmp_path, {"model": source}) as ckpt:
        ckpt.save(1)
    with torch.device("meta"):
        target = torch.nn.Linear(32, 32)
    with savegame.Checkpointer(tmp_path, {"model": target}) as ckpt:
        ckpt.restore(map_location="cuda", assign=True)
    assert target.weight.is_cuda and torch.equal(target.weight.cpu(), source.weight.detach())


def test_the_rng_of_every_visible_gpu_round_trips(tmp_path):
    count = torch.cuda.device_count()
    torch.cuda.manual_seed_all(11)
    for index in range(count):
        torch.rand(1, device=f"cuda:{index}")  # initialise every device's generator
    with savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(1, 1).cuda()}) as ckpt:
        ckpt.save(0)
        ckpt.wait()
        expected = [torch.rand(3, device=f"cuda:{i}").tolist() for i in range(count)]
        torch.cuda.manual_seed_all(99)
        ckpt.restore(map_location="cuda")
    assert [torch.rand(3, device=f"cuda:{i}").tolist() for i in range(count)] == expected


def test_rng_states_for_another_gpu_count_restore_what_fits(caplog):
    torch.cuda.init()
    count = torch.cuda.device_count()
    state = rng.capture()
    assert len(state["cuda"]) == count
    expected = [torch.rand(2, device=f"cuda:{i}").tolist() for i in range(count)]
    state["cuda"] = state["cuda"] + [state["cuda"][0]]  # saved on a machine with one GPU more
    with caplog.at_level(logging.WARNING, logger="savegame.engine.rng"):
        rng.restore(state)
    assert f"holds {count + 1} CUDA RNG states but {count} devices" in caplog.text
    assert [torch.rand(2, device=f"cuda:{i}").tolist() for i in range(count)] == expected
    fewer = rng.capture()
    fewer["cuda"] = fewer["cuda"][:1]  # saved on a machine with one GPU
    expected_first = torch.rand(2, device="cuda:0").tolist()
    rng.restore(fewer)
    assert torch.rand(2, device="cuda:0").tolist() == expected_first
