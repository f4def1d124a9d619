"""Tensors round-trip exactly through the on-disk format: every dtype, every layout we accept."""

from __future__ import annotations

import json

import pytest
import torch

import savegame
from savegame.engine.reader import read_manifest, read_tree
from savegame.engine.writer import Staging, prepare, snapshot, write_checkpoint
from savegame.errors import UnsupportedValueError
from savegame.format import layout
from savegame.format import names as n
from savegame.storage import LocalStorage

COMMON_DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
    torch.complex32, torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.float8_e8m0fnu,
]
# Every dtype the installed torch has (bits*, int1-7, uint1-7, float4 included), so a new one
# is tested the day it appears; quantized dtypes are refused at save (see below).
ALL_DTYPES = sorted({d for d in vars(torch).values() if isinstance(d, torch.dtype)
                     and not str(d).startswith("torch.q")}, key=str)
assert set(COMMON_DTYPES) <= set(ALL_DTYPES)


def random_tensor(dtype: torch.dtype, shape=(3, 5)) -> torch.Tensor:
    raw = torch.randint(0, 256, (*shape, torch.empty((), dtype=dtype).element_size()), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def save_and_read(tmp_path, tree, *, staged: bool, shard_bytes: int = 1 << 30, mmap: bool = False):
    storage = LocalStorage(tmp_path)
    prepared = prepare({n.TREE_STATE: {"value": tree}}, {n.M_STEP: 1, n.M_METRICS: {}}, shard_bytes)
    write_checkpoint(storage, "step-0000000001", prepared, snapshot(prepared, Staging() if staged else None))
    doc = read_manifest(storage, "step-0000000001")
    return read_tree(storage, "step-0000000001", doc, mmap=mmap)[n.TREE_STATE]["value"]


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("staged", [True, False], ids=["async-staging", "direct"])
def test_every_dtype_round_trips_bit_exactly(tmp_path, staged):
    tree = {str(d): random_tensor(d) for d in ALL_DTYPES}
    out = save_and_read(tmp_path, tree, staged=staged)
    for key, tensor in tree.items():
        assert bits_equal(out[key], tensor), key


@pytest.mark.parametrize("mmap", [False, True])
def test_shapes_and_layouts_round_trip(tmp_path, mmap):
    base = torch.randn(6, 8, dtype=torch.float64)
    tree = {
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "transposed": torch.randn(4, 7).t(),
        "strided": torch.arange(40, dtype=torch.int32)[::3],
        "big_int": torch.tensor([2**62, -(2**63)], dtype=torch.int64),
        "param": torch.nn.Parameter(torch.randn(3)),
        "base": base,
    }
    out = save_and_read(tmp_path, tree, staged=True, mmap=mmap)
    for key, tensor in tree.items():
        assert bits_equal(out[key], tensor.detach()), key


def test_shared_storage_is_kept_shared(tmp_path):
    weight = torch.randn(10, 4)
    tree = {"embed": weight, "head": weight, "row": weight[2], "col": weight[:, 1], "other": torch.ones(2)}
    out = save_and_read(tmp_path, tree, staged=True)
    assert out["embed"] is out["head"] or out["embed"].data_ptr() == out["head"].data_ptr()
    for key in ("embed", "head", "row", "col"):
        assert bits_equal(out[key], tree[key]), key
    out["embed"][2, 1] = 123.0
    assert out["row"][1].item() == 123.0 and out["col"][2].item() == 123.0
    assert out["other"].untyped_storage().data_ptr() != out["embed"].untyped_storage().data_ptr()


def test_tied_weights_of_a_module_stay_tied(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(11, 4)
            self.head = torch.nn.Linear(4, 11, bias=False)
            self.head.weight = self.embed.weight

    out = save_and_read(tmp_path, {"m": Tied().state_dict()}, staged=False)["m"]
    assert out["embed.weight"].data_ptr() == out["head.weight"].data_ptr()


def test_many_shards_round_trip(tmp_path):
    tree = {f"t{i}": torch.randn(100) for i in range(20)}
    out = save_and_read(tmp_path, tree, staged=True, shard_bytes=1000)
    assert len(list((tmp_path / "step-0000000001").glob("tensors-*.safetensors"))) > 1
    assert all(torch.equal(out[k], v) for k, v in tree.items())


def test_files_are_readable_by_safetensors(tmp_path):
    from safetensors import safe_open

    tree = {"w": torch.randn(3, 3), "b": torch.randn(3).to(torch.bfloat16), "c": torch.randn(2, dtype=torch.complex128)}
    save_and_read(tmp_path, tree, staged=True)
    doc = read_manifest(LocalStorage(tmp_path), "step-0000000001")
    path = tmp_path / "step-0000000001" / doc[n.M_FILES][0]
    with safe_open(str(path), framework="pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    entry_of = doc[n.M_TENSORS][n.T_ENTRY]  # tensors are numbered in tree order: w, b, c
    assert torch.equal(got[f"e{entry_of[0]}"], tree["w"])
    assert torch.equal(got[f"e{entry_of[1]}"], tree["b"])
    # complex128 has no safetensors name: plain readers see its raw bytes
    assert torch.equal(got[f"e{entry_of[2]}"], tree["c"].view(torch.uint8).reshape(-1))


class Subclass(torch.Tensor):
    """Stands for DTensor and friends: their metadata would be lost as plain bytes."""


@pytest.mark.parametrize("make,match", [
    (lambda: torch.randn(3, 3).to_sparse(), "sparse"),
    (lambda: torch.empty(3, device="meta"), "meta"),
    (lambda: torch.quantize_per_tensor(torch.randn(3), 0.1, 0, torch.qint8), "quantized"),
    (lambda: torch.randn(3).as_subclass(Subclass), "subclass Subclass"),
])
def test_unsupported_tensor_kinds_fail_at_save_naming_the_key(tmp_path, make, match):
    with pytest.raises(UnsupportedValueError, match=rf"opt\.state.*{match}"):
        prepare({"opt": {"state": make()}}, {n.M_STEP: 0, n.M_METRICS: {}})


def test_an_expanded_tensor_is_stored_by_its_storage_not_every_element(tmp_path):
    row = torch.arange(4, dtype=torch.float32)
    expanded = row.expand(100_000, 4)  # 1.6 MB of elements over 16 bytes of storage
    prepared = prepare({"x": expanded}, {n.M_STEP: 0, n.M_METRICS: {}})
    assert prepared.nbytes == 16
    out = save_and_read(tmp_path, {"x": expanded}, staged=True)
    assert torch.equal(out["x"], expanded) and out["x"].stride() == (0, 1)


def numbers(tree):
    """The tensor numbers a manifest tree refers to."""
    if isinstance(tree, dict):
        found = [tree[k] for k in ("$t", "$nd") if isinstance(tree.get(k), int)]
        return found + [x for v in tree.values() for x in numbers(v)]
    return [x for v in tree for x in numbers(v)] if isinstance(tree, list) else []


def test_rng_states_go_in_a_last_small_file_of_their_own(tmp_path):
    """Restoring checks the RNG states' bytes before any byte reaches the model; in a small file of their own,
    that check is one cheap request on an object store instead of a range of a large file."""
    model = torch.nn.Linear(64, 64)
    with savegame.Checkpointer(tmp_path / "run", {"model": model}, async_save=False) as ckpt:
        ckpt.save(1)
    manifest = json.loads(next((tmp_path / "run").glob("step-*/manifest.json")).read_text())
    entry_of, file_of = manifest["tensors"]["entry"], manifest["entries"]["file"]
    rng_tensors = numbers(manifest["tree"]["rng"])
    assert len(rng_tensors) == 2 and len(manifest["files"]) == 2  # NumPy's and torch's states
    assert [j for j in range(len(entry_of)) if file_of[entry_of[j]] == 1] == sorted(rng_tensors)
    plan = layout.plan([torch.ones(4), torch.zeros(3, dtype=torch.uint8)], 1 << 30, apart=[1])
    assert plan.files == [[0], [1]]
    shared = torch.zeros(3, dtype=torch.uint8)
    plan = layout.plan([torch.ones(4), shared, shared], 1 << 30, apart=[1])  # another tensor shares it: stays
    assert plan.files == [[0, 1]]
    assert layout.plan([torch.zeros(3, dtype=torch.uint8)], 1 << 30, apart=[0]).files == [[0]]  # nothing else


def test_incremental_saves_keep_the_rng_states_in_their_one_pack(tmp_path):
    model = torch.nn.Linear(8, 8)
    with savegame.Checkpointer(tmp_path / "run", {"model": model}, incremental=True, async_save=False) as ckpt:
        ckpt.save(1)
    manifest = json.loads(next((tmp_path / "run").glob("step-*/manifest.json")).read_text())
    assert len(manifest["files"]) == 1
