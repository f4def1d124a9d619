"""Restored tensors own their storage, and map_location works for every value kind."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import savegame
from savegame.errors import ConfigurationError


class GeneratorHolder:
    """A user object whose state holds a torch.Generator state (like a shuffling sampler)."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "pad": torch.arange(1000)}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])


def test_generator_state_restores_through_the_checkpointer(tmp_path):
    # The state came back as a view into one file buffer, and Generator.set_state on such a
    # view crashed the interpreter (torch 2.13). Every restored tensor must own its storage.
    holder = GeneratorHolder(7)
    torch.randn(3, generator=holder.gen)
    with savegame.Checkpointer(tmp_path, state={"h": holder, "w": torch.nn.Linear(3, 3)}) as ckpt:
        ckpt.save(1)
        expected = torch.randn(5, generator=holder.gen)
        fresh = GeneratorHolder(0)
    with savegame.Checkpointer(tmp_path, state={"h": fresh, "w": torch.nn.Linear(3, 3)}) as ckpt:
        ckpt.restore()
    assert torch.equal(torch.randn(5, generator=fresh.gen), expected)


def test_optimizer_state_does_not_keep_the_file_buffer_alive(tmp_path):
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    with savegame.Checkpointer(tmp_path, state={"model": model, "opt": opt}) as ckpt:
        ckpt.save(1)
    fresh = torch.nn.Linear(64, 64)
    fresh_opt = torch.optim.Adam(fresh.parameters())
    with savegame.Checkpointer(tmp_path, state={"model": fresh, "opt": fresh_opt}) as ckpt:
        ckpt.restore()
    for state in fresh_opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.numel():
                assert value.untyped_storage().nbytes() == value.numel() * value.element_size()


def test_load_with_map_location_meta_keeps_numpy_arrays(tmp_path):
    class Arrays:
        def state_dict(self) -> dict:
            return {"a": np.arange(6, dtype=np.int16), "t": torch.ones(3)}

        def load_state_dict(self, state: dict) -> None:
            pass

    with savegame.Checkpointer(tmp_path, state={"x": Arrays()}) as ckpt:
        ckpt.save(3)
    tree = savegame.load(tmp_path, map_location="meta")
    assert tree["state"]["x"]["t"].device.type == "meta"
    np.testing.assert_array_equal(tree["state"]["x"]["a"], np.arange(6, dtype=np.int16))
    assert isinstance(tree["rng"]["numpy"][1], np.ndarray)  # the NumPy RNG state stays an array


@pytest.mark.parametrize("bad", ["bogus", 5.5, object()])
def test_a_bad_map_location_is_a_configuration_error(tmp_path, bad):
    with savegame.Checkpointer(tmp_path, state={"m": torch.nn.Linear(2, 2)}) as ckpt:
        ckpt.save(1)
    with pytest.raises(ConfigurationError, match="map_location"):
        savegame.load(tmp_path, map_location=bad)


def test_a_device_this_process_lacks_is_refused_before_anything_is_loaded(tmp_path):
    # The everyday case: a checkpoint of a GPU run opened on a laptop with map_location="cuda".
    absent = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    model = torch.nn.Linear(2, 2)
    with savegame.Checkpointer(tmp_path, state={"m": model}) as ckpt:
        ckpt.save(1)
        with torch.no_grad():
            model.weight.fill_(7.0)
        with pytest.raises(ConfigurationError, match=f"map_location '{absent}' is not available.*map_location='cpu'"):
            ckpt.restore(map_location=absent)
        assert model.weight.eq(7.0).all()
    with pytest.raises(ConfigurationError, match="is not available"):
        savegame.load(tmp_path, map_location=absent)


def test_restore_reads_into_the_models_own_memory(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64))
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    addresses = {k: v.data_ptr() for k, v in model.state_dict().items()}
    with savegame.Checkpointer(tmp_path, {"model": model}) as ckpt:
        ckpt.save(1)
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        ckpt.restore()
    for key, value in model.state_dict().items():
        assert value.data_ptr() == addresses[key], key  # the same memory, not new tensors
        assert torch.equal(value, saved[key]), key


def test_staging_buffers_are_allocated_once_and_reused_on_the_cpu(tmp_path):
    model = torch.nn.Linear(256, 256)
    with savegame.Checkpointer(tmp_path, {"model": model}) as ckpt:
        ckpt.save(1)
        ckpt.wait()
        buffers = list(ckpt._staging._buffers.values())  # type: ignore[union-attr]
        assert buffers and not any(b.is_pinned() for b in buffers)
        addresses = [b.data_ptr() for b in buffers]
        for step in (2, 3):
            ckpt.save(step)
            ckpt.wait()
            assert [b.data_ptr() for b in ckpt._staging._buffers.values()] == addresses  # type: ignore[union-attr]


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="resident memory is read from /proc (Linux)")
def test_load_with_mmap_reads_only_the_pages_touched(tmp_path):
    class Big:
        def state_dict(self) -> dict:
            return {f"t{i}": torch.full((8 << 20,), float(i), dtype=torch.uint8) for i in range(16)}  # 128 MiB

        def load_state_dict(self, state: dict) -> None:
            pass

    with savegame.Checkpointer(tmp_path, {"big": Big()}, async_save=False) as ckpt:
        ckpt.save(1)
    before = resident_bytes()
    tree = savegame.load(tmp_path, mmap=True)
    mapped = resident_bytes() - before
    assert mapped < 16 << 20, f"mmap=True load made {mapped >> 20} MiB resident before any tensor was touched"
    assert int(tree["state"]["big"]["t5"].sum()) == 5 * (8 << 20)  # touching one tensor reads it
    assert resident_bytes() - before >= 6 << 20
