"""Where a restore puts each tensor (savegame.engine.todevice), checked on the CPU with the meta device.

``map_location`` moves a model's tensors and anything saved on a GPU; a tensor
saved on the CPU outside a model (an Adam ``step``, an RNG state) stays there,
and a target the caller owns decides its own device. ``load()`` moves everything.
The GPU run of the same decisions is in test_cuda_paths.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import savegame
from savegame.engine import reader, todevice
from savegame.errors import CorruptCheckpointError
from savegame.format import checksum
from savegame.format import names as n
from savegame.storage.local import LocalStorage

META = torch.device("meta")


def table(devices: list[str], entries: list[int] | None = None) -> dict:
    return {n.T_ENTRY: entries if entries is not None else list(range(len(devices))), n.T_DEVICE: devices,
            n.T_VIEWS: []}


def test_saved_on_the_cpu_stays_there_unless_it_follows_map_location():
    places = todevice.entry_places(table(["cpu", "cuda:0", "cpu"]), 3, META, follow={0}, chosen={})
    assert places == [META, META, None]


def test_without_models_everything_follows_map_location():
    assert todevice.entry_places(table(["cpu", "cuda:1"]), 2, META, follow=None, chosen={}) == [META, META]


def test_a_target_decides_its_own_device():
    target = torch.empty(3, device="meta")
    places = todevice.entry_places(table(["cpu", "cpu"]), 2, torch.device("cpu"), follow=None, chosen={1: target})
    assert places == [None, META]
    cpu_target = torch.empty(3)
    assert todevice.entry_places(table(["cuda:0"]), 1, META, follow=None, chosen={0: cpu_target}) == [None]


def test_nothing_moves_without_map_location_or_device_targets():
    assert todevice.entry_places(table(["cuda:0", "cpu"]), 2, None, follow=set(), chosen={}) is None
    assert todevice.entry_places(table(["cuda:0"]), 1, torch.device("cpu"), follow=None,
                                 chosen={0: torch.empty(1)}) is None


def test_tensors_sharing_an_entry_go_together():
    places = todevice.entry_places(table(["cpu", "cpu", "cpu"], entries=[0, 0, 1]), 2, META, follow={1}, chosen={})
    assert places == [META, None]


def _trained(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    with savegame.Checkpointer(tmp_path, {"model": model, "opt": opt}) as ckpt:
        ckpt.save(1)
    storage = LocalStorage(str(tmp_path))
    name = next(d.name for d in tmp_path.iterdir() if d.name.startswith("step-"))
    return model, opt, storage, name, reader.read_manifest(storage, name)


def test_module_tensors_are_the_models_only(tmp_path):
    model, _, _, _, doc = _trained(tmp_path)
    numbers = todevice.module_tensors({"model": model, "opt": object()}, doc)
    assert len(numbers) == 2  # weight and bias; not the moments, steps or RNG states
    table_ = doc[n.M_TENSORS]
    shapes = sorted(tuple(doc[n.M_ENTRIES][n.E_SHAPE][table_[n.T_ENTRY][j]]) for j in numbers)
    assert shapes == [(4,), (4, 8)]


def test_a_restore_keeps_adam_step_and_rng_on_the_cpu_and_moves_the_model(tmp_path):
    model, opt, storage, name, doc = _trained(tmp_path)
    follow = todevice.module_tensors({"model": model, "opt": opt}, doc)
    tree = reader.read_tree(storage, name, doc, map_location="meta", follow=follow)
    state = tree[n.TREE_STATE]
    assert state["model"]["weight"].is_meta and state["model"]["bias"].is_meta
    for moments in state["opt"]["state"].values():
        assert moments["step"].is_cpu, "a CPU step must not follow map_location"
        assert moments["exp_avg"].is_cpu  # saved on the CPU, outside a model
    assert tree[n.TREE_RNG]["torch"].is_cpu
    assert tree[n.TREE_RNG]["numpy"][1].dtype.kind == "u"  # a NumPy array, rebuilt on the CPU


def test_load_still_moves_everything(tmp_path):
    _trained(tmp_path)
    tree = savegame.load(tmp_path, map_location="meta")
    assert tree["state"]["model"]["weight"].is_meta
    assert all(m["step"].is_meta for m in tree["state"]["opt"]["state"].values())
    assert tree["rng"]["numpy"][1].dtype.kind == "u"  # NumPy arrays stay arrays


def test_restore_with_map_location_gives_the_saved_values(tmp_path):
    model, opt, _, _, _ = _trained(tmp_path)
    fresh = torch.nn.Linear(8, 4)
    fresh_opt = torch.optim.Adam(fresh.parameters())
    with savegame.Checkpointer(tmp_path, {"model": fresh, "opt": fresh_opt}) as ckpt:
        ckpt.restore(map_location="cpu")
    assert torch.equal(fresh.weight, model.weight)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(fresh_opt.state[q][key], opt.state[p][key]), key


def _columns(tensors: list[torch.Tensor]) -> tuple[dict, np.ndarray]:
    raw = [t.reshape(-1).view(torch.uint8).numpy() for t in tensors]
    starts = [sum(len(r) for r in raw[:i]) for i in range(len(raw))]
    ends = [s + len(r) for s, r in zip(starts, raw, strict=True)]
    sums = [checksum.CURRENT.of(r.tobytes()) for r in raw]
    data = np.concatenate(raw) if raw else np.empty(0, dtype=np.uint8)
    return {n.E_START: starts, n.E_END: ends, n.E_SUM: sums}, data


@pytest.mark.parametrize("slot", [16, 24, 1 << 20])
def test_fill_streams_every_entry_through_the_slots_and_unlocks_them(slot):
    from tests.unit.test_staging_logic import FakePinner

    torch.manual_seed(1)
    saved = [torch.randn(37), torch.arange(5, dtype=torch.int16), torch.empty(0), torch.tensor(True),
             torch.randn(4, 9).double(), torch.randint(0, 255, (3,), dtype=torch.uint8)]
    columns, data = _columns(saved)
    targets = {e: torch.full_like(t, 0) for e, t in enumerate(saved)}
    pinner = FakePinner()
    todevice.fill(range(len(saved)), targets, columns, checksum.CURRENT, data.ctypes.data, "here", slot=slot,
                  pinner=pinner)
    for e, t in enumerate(saved):
        assert torch.equal(targets[e], t), e
    assert pinner.live == {}, "the slots must be unregistered after a restore"


def test_fill_refuses_a_damaged_entry_and_still_unlocks_the_slots():
    from tests.unit.test_staging_logic import FakePinner

    saved = [torch.randn(100), torch.randn(100)]
    columns, data = _columns(saved)
    data[500] ^= 0xFF  # in the second entry
    pinner = FakePinner()
    targets = {e: torch.zeros_like(t) for e, t in enumerate(saved)}
    with pytest.raises(CorruptCheckpointError, match="here: checksum mismatch in entry 1"):
        todevice.fill([0, 1], targets, columns, checksum.CURRENT, data.ctypes.data, "here", slot=64, pinner=pinner)
    assert torch.equal(targets[0], saved[0]) and pinner.live == {}
    todevice.fill([0, 1], targets, columns, None, data.ctypes.data, "here", slot=64, pinner=pinner)  # no verify
    assert not torch.equal(targets[1], saved[1])


@pytest.mark.parametrize("slot", [(2 << 20) + 7, 8 << 20])
def test_fill_copies_big_entries_with_several_threads_exactly(slot):
    from tests.unit.test_staging_logic import FakePinner

    saved = [torch.randn((5 << 20) // 4 + 3), torch.arange(11, dtype=torch.int64), torch.randn(3 << 18).double()]
    columns, data = _columns(saved)
    targets = {e: torch.zeros_like(t) for e, t in enumerate(saved)}
    pinner = FakePinner()
    todevice.fill([2, 0, 1], targets, columns, checksum.CURRENT, data.ctypes.data, "here", slot=slot, pinner=pinner)
    assert all(torch.equal(targets[e], t) for e, t in enumerate(saved)) and pinner.live == {}
