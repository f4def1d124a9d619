"""compression="zstd" end to end: exact round trips, smaller files, the CLI, mmap loads, S3."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import savegame
from savegame.cli import main
from savegame.engine.reader import read_manifest
from savegame.format import names as n
from savegame.storage import LocalStorage

STEP = "step-0000000001"


class Extras:
    """Tensors of every kind a compressed save must keep exactly."""

    def __init__(self) -> None:
        base = torch.arange(4096, dtype=torch.float32) / 64
        self.value = {"ids": torch.arange(8192) % 97, "i32": torch.arange(4096, dtype=torch.int32) % 5,
                      "empty": torch.empty(0, 16), "empty_bf16": torch.empty(3, 0, dtype=torch.bfloat16),
                      "base": base, "view": base[100:300], "strided": base.reshape(64, 64).t(),
                      "noise": torch.randint(0, 256, (8192,), dtype=torch.uint8), "flags": torch.arange(5000) % 2 == 0,
                      "scalar": torch.tensor(3.5, dtype=torch.float64)}

    def state_dict(self) -> dict:
        return self.value

    def load_state_dict(self, state: dict) -> None:
        self.value = dict(state)


def objects(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)).to(dtype)
    with torch.no_grad():  # trained-like weights: N(0, 0.02)
        for p in model.parameters():
            p.normal_(0, 0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(torch.randn(8, 64, dtype=dtype)).pow(2).mean().backward()
        opt.step()
    return {"model": model, "optimizer": opt, "extras": Extras()}


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def state_of(objs: dict) -> dict:
    return {"model": objs["model"].state_dict(), "optimizer": objs["optimizer"].state_dict(),
            "extras": objs["extras"].state_dict()}


@pytest.mark.parametrize("dtype, async_save, shard_bytes", [(torch.float32, True, 1 << 30),
                                                             (torch.bfloat16, False, 1 << 30),
                                                             (torch.float32, True, 20_000)])  # many files
def test_model_adamw_and_every_tensor_kind_round_trip_exactly(tmp_path, dtype, async_save, shard_bytes):
    objs = objects(0, dtype)
    with savegame.Checkpointer(tmp_path, objs, compression="zstd", async_save=async_save,
                               shard_bytes=shard_bytes) as ckpt:
        ckpt.save(1)
    expected = {k: _clone(v) for k, v in state_of(objs).items()}
    codecs = read_manifest(LocalStorage(tmp_path), STEP)[n.M_ENTRIES][n.E_CODEC]
    assert {"raw", "zstd+bytegroup"} <= set(codecs)  # mixed entries in one checkpoint
    fresh = objects(1, dtype)
    with savegame.Checkpointer(tmp_path, fresh, compression="zstd") as ckpt:
        assert ckpt.restore().step == 1
    assert same(state_of(fresh), expected)
    extras = fresh["extras"].value
    assert extras["view"].untyped_storage().data_ptr() == extras["base"].untyped_storage().data_ptr()
    extras["base"][150] = -1.0  # the view still shares the restored storage
    assert extras["view"][50].item() == -1.0
    for mmap in (False, True):
        loaded = savegame.load(tmp_path / STEP, mmap=mmap)
        assert same(dict(loaded["state"]["model"]), expected["model"])
        assert same(dict(loaded["state"]["extras"]), expected["extras"])


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


def test_compressible_state_is_smaller_on_disk_and_restores_the_same(tmp_path):
    sizes = {}
    for comp in (None, "zstd"):
        objs = objects(0, torch.bfloat16)
        with savegame.Checkpointer(tmp_path / str(comp), objs, compression=comp) as ckpt:
            ckpt.save(1)
        sizes[comp] = sum(p.stat().st_size for p in (tmp_path / str(comp) / STEP).iterdir())
    assert sizes["zstd"] < 0.8 * sizes[None]
    plain = savegame.load(tmp_path / "None" / STEP)
    packed = savegame.load(tmp_path / "zstd" / STEP)
    assert same(dict(plain["state"]), dict(packed["state"]))


def test_a_save_in_which_nothing_pays_is_byte_for_byte_the_plain_format(tmp_path):
    from savegame.engine.writer import prepare, snapshot, write_checkpoint

    noise = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8)
    for comp in (None, "zstd"):
        tree = {n.TREE_STATE: {"x": {"noise": noise, "small": torch.zeros(10)}}, n.TREE_RNG: {}}
        prepared = prepare(tree, {n.M_STEP: 1, n.M_METRICS: {}, n.M_TIME: 0.0, n.M_PINNED: False})
        prepared.compression = comp
        (tmp_path / str(comp)).mkdir()
        write_checkpoint(LocalStorage(tmp_path / str(comp)), STEP, prepared, snapshot(prepared, None))
    for name in (n.MANIFEST, "tensors-00000.safetensors"):
        assert (tmp_path / "None" / STEP / name).read_bytes() == (tmp_path / "zstd" / STEP / name).read_bytes()
    assert json.loads((tmp_path / "zstd" / STEP / n.MANIFEST).read_bytes())["format_version"] == 2


def test_cli_verify_inspect_export_and_ls_read_compressed_checkpoints(tmp_path):
    objs = objects()
    with savegame.Checkpointer(tmp_path / "run", objs, compression="zstd") as ckpt:
        ckpt.save(1)
    ckpt_dir = str(tmp_path / "run" / STEP)
    runner = CliRunner()
    for args in (["verify", str(tmp_path / "run")], ["inspect", ckpt_dir], ["inspect", "--json", "--tree", ckpt_dir],
                 ["ls", "--verify", str(tmp_path / "run")],
                 ["export", ckpt_dir, "--to", str(tmp_path / "w.safetensors")]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, (args, result.output)
    shown = runner.invoke(main, ["inspect", "--json", ckpt_dir]).output
    packed = json.loads(shown)["compressed"]
    assert packed["entries"] > 0 and packed["stored_bytes"] < packed["raw_bytes"]
    assert "compressed" in runner.invoke(main, ["inspect", ckpt_dir]).output
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "w.safetensors"))
    assert same(exported, {k: v for k, v in objs["model"].state_dict().items()})


def test_restore_of_a_damaged_compressed_checkpoint_falls_back(tmp_path):
    from tests.damage import flip_data_byte

    objs = objects()
    with savegame.Checkpointer(tmp_path, objs, compression="zstd", async_save=False) as ckpt:
        ckpt.save(1)
        old = {k: v.clone() for k, v in objs["model"].state_dict().items()}
        with torch.no_grad():
            objs["model"][0].weight.add_(1.0)
        ckpt.save(2)
    doc = read_manifest(LocalStorage(tmp_path), "step-0000000002")
    entry = doc[n.M_ENTRIES][n.E_CODEC].index("zstd+bytegroup")
    flip_data_byte(tmp_path / "step-0000000002", entry)
    assert CliRunner().invoke(main, ["verify", str(tmp_path)]).exit_code == 1
    fresh = objects(1)
    with savegame.Checkpointer(tmp_path, fresh) as ckpt:
        assert ckpt.restore().step == 1
    assert same(dict(fresh["model"].state_dict()), old)


def test_compressed_checkpoints_on_s3(run_url):
    objs = objects()
    with savegame.Checkpointer(run_url, objs, compression="zstd") as ckpt:
        ckpt.save(1)
    expected = {k: v.clone() for k, v in objs["model"].state_dict().items()}
    fresh = objects(1)
    with savegame.Checkpointer(run_url, fresh) as ckpt:
        assert ckpt.restore().step == 1
    assert same(dict(fresh["model"].state_dict()), expected)
    assert same(dict(savegame.load(f"{run_url}/{STEP}")["state"]["model"]), expected)



def test_a_crash_at_any_operation_of_a_compressed_save_leaves_the_older_checkpoint_restorable(tmp_path):
    from savegame.run.directory import RunDir
    from savegame.storage import FaultyStorage, InjectedFault

    def model() -> torch.nn.Linear:
        m = torch.nn.Linear(64, 64)
        with torch.no_grad():
            m.weight.copy_((torch.arange(4096).reshape(64, 64) % 13) / 16)
        return m

    probe = FaultyStorage(LocalStorage(tmp_path / "probe"))
    with savegame.Checkpointer(tmp_path / "probe", {"m": model()}, storage=probe, compression="zstd",
                               async_save=False) as ckpt:
        ckpt.save(1)
        start = len(probe.ops)
        ckpt.save(2)
        total = len(probe.ops) - start
    for op in range(total):
        run, m = tmp_path / f"run{op}", model()
        with savegame.Checkpointer(run, {"m": m}, compression="zstd", async_save=False) as ckpt:
            ckpt.save(1)
        first = m.weight.detach().clone()
        faulty = FaultyStorage(LocalStorage(run), crash=True)
        ckpt = savegame.Checkpointer(run, {"m": m}, storage=faulty, compression="zstd", async_save=False)
        ckpt.restore()
        faulty.fail_at = len(faulty.ops) + op
        with torch.no_grad():
            m.weight.add_(1.0)
        with pytest.raises(InjectedFault):
            ckpt.save(2)
        ckpt._lock.release()  # the "dead" process's lock goes with it
        fresh = model()
        with savegame.Checkpointer(run, {"m": fresh}) as again:
            step = again.restore().step
        assert step in (1, 2), op
        assert torch.equal(fresh.weight, first if step == 1 else first + 1.0), op
        assert "step-0000000001" in RunDir(LocalStorage(run)).names()


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int16, torch.uint8,
          torch.bool, torch.complex64, torch.float8_e4m3fn]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=st.lists(st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 40), max_size=3), st.booleans()),
                      min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_random_tensors_round_trip_exactly_through_a_compressed_checkpoint(tmp_path_factory, specs, seed):
    from savegame.engine.writer import prepare, snapshot, write_checkpoint

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, (dtype, shape, smooth) in enumerate(specs):
        count = 1
        for dim in shape:
            count *= dim
        raw = (torch.arange(count * dtype.itemsize) % 5).to(torch.uint8) if smooth else \
            torch.randint(0, 256, (count * dtype.itemsize,), dtype=torch.uint8, generator=gen)
        tensors[f"t{i}"] = raw.view(dtype).reshape(shape)
    root = tmp_path_factory.mktemp("prop")
    tree = {n.TREE_STATE: {"x": tensors}, n.TREE_RNG: {}}
    prepared = prepare(tree, {n.M_STEP: 1, n.M_METRICS: {}, n.M_TIME: 0.0, n.M_PINNED: False})
    prepared.compression = "zstd"
    write_checkpoint(LocalStorage(root), STEP, prepared, snapshot(prepared, None))
    for mmap in (False, True):
        back = savegame.load(root / STEP, mmap=mmap)["state"]["x"]
        for key, t in tensors.items():
            got = back[key]
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), key


def test_one_run_can_switch_between_incremental_and_compressed_saves(tmp_path):
    """Non-incremental compressed saves between incremental ones: each save is read as what it is."""
    from savegame.engine.reader import verify_checkpoint
    from savegame.run.directory import RunDir

    objs = objects()
    expected = {}
    for step, options in enumerate(({"incremental": True}, {"compression": "zstd"}, {"incremental": True}), 1):
        with savegame.Checkpointer(tmp_path, objs, **options) as ckpt:
            if step > 1:
                ckpt.restore()
            with torch.no_grad():
                objs["model"][0].weight.add_(1.0)
            ckpt.save(step)
        expected[step] = {k: v.clone() for k, v in objs["model"].state_dict().items()}
    storage = LocalStorage(tmp_path)
    versions = [read_manifest(storage, f"step-{s:010d}")[n.M_VERSION] for s in (1, 2, 3)]
    assert versions == [4, 5, 4]
    assert all(verify_checkpoint(storage, name) == [] for name in RunDir(storage).names())
    for step in (1, 2, 3):
        fresh = objects(1)
        with savegame.Checkpointer(tmp_path, fresh) as ckpt:
            assert ckpt.restore(step).step == step
        assert same(dict(fresh["model"].state_dict()), expected[step])


def test_incremental_compressed_saves_store_frozen_weights_once_and_share_them_with_plain_saves(tmp_path):
    """An entry is known by the digest of its raw bytes, so incremental saves reference what an earlier save
    stored whether either was compressed: a frozen backbone is stored once across both kinds."""
    from savegame.engine.reader import verify_checkpoint

    torch.manual_seed(0)
    backbone, head = torch.nn.Linear(128, 128), torch.nn.Linear(128, 4)
    with torch.no_grad():
        backbone.weight.copy_(torch.randn(128, 128).mul(16).round().div(64))  # compressible, frozen
    backbone.requires_grad_(False)
    model = torch.nn.Sequential(backbone, head)
    opt = torch.optim.AdamW(head.parameters())
    plans = [{"compression": "zstd"}, {"compression": "zstd"}, {}, {"compression": "zstd"}, {}]
    expected, storage = {}, LocalStorage(tmp_path)
    for step, options in enumerate(plans, 1):
        with savegame.Checkpointer(tmp_path, {"model": model, "optimizer": opt}, incremental=True, **options) as ckpt:
            if step > 1:
                ckpt.restore()
            model(torch.randn(2, 128)).sum().backward()
            opt.step()
            ckpt.save(step)
        expected[step] = {k: v.clone() for k, v in model.state_dict().items()}
    docs = {s: read_manifest(storage, f"step-{s:010d}") for s in expected}
    weight = docs[1][n.M_TENSORS][n.T_ENTRY][docs[1][n.M_TREE][n.TREE_STATE]["model"]["0.weight"]["$t"]]
    first = docs[1][n.M_FILES][docs[1][n.M_ENTRIES][n.E_FILE][weight]]
    assert docs[1][n.M_ENTRIES][n.E_CODEC][weight] == "zstd+bytegroup"
    for doc in docs.values():  # every later save references the first save's compressed backbone
        assert doc[n.M_VERSION] == 5 and first in doc[n.M_FILES]
    packs = sorted((tmp_path / "data").iterdir(), key=lambda p: p.stat().st_size)
    assert packs[-1].name == first.split("/")[1] and sum(p.stat().st_size for p in packs[:-1]) < 4 * 128 * 128
    for step, state in expected.items():
        assert verify_checkpoint(storage, f"step-{step:010d}") == []
        fresh = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 4))
        with savegame.Checkpointer(tmp_path, {"model": fresh}) as ckpt:
            ckpt.restore(step, only=["model"])
        assert same(dict(fresh.state_dict()), state)


def test_an_incremental_save_references_raw_entries_a_plain_save_stored(tmp_path):
    torch.manual_seed(0)
    frozen = {"w": torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64) / 7}
    holder = Extras()
    holder.value = frozen
    for step, options in enumerate(({}, {"compression": "zstd"}), 1):
        with savegame.Checkpointer(tmp_path, {"x": holder}, incremental=True, **options) as ckpt:
            if step > 1:
                ckpt.restore()
            ckpt.save(step)
    one, two = (read_manifest(LocalStorage(tmp_path), f"step-{s:010d}") for s in (1, 2))
    assert one[n.M_VERSION] == 4 and set(one[n.M_FILES]) <= set(two[n.M_FILES])  # the raw entry, referenced
    assert len(list((tmp_path / "data").iterdir())) <= 2
    assert same(dict(savegame.load(tmp_path / "step-0000000002")["state"]["x"]), frozen)


@pytest.mark.slow  # a child process (imports torch): a few seconds
def test_sigkill_during_compressed_saves_leaves_the_newest_durable_checkpoint_restorable(tmp_path):
    from pathlib import Path

    from savegame.engine.reader import verify_checkpoint
    from savegame.run.directory import RunDir
    from tests.integration._zstd_save_child import fill
    from tests.integration.procs import run

    child = Path(__file__).with_name("_zstd_save_child.py")
    assert run(child, str(tmp_path), "50", kill_on="step 4") == -9  # step 4's write is in flight (or done)
    storage = LocalStorage(tmp_path)
    names = RunDir(storage).names()
    assert names and all(verify_checkpoint(storage, name) == [] for name in names)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.Linear(1024, 256))
    with savegame.Checkpointer(tmp_path, {"model": model}) as ckpt:
        step = ckpt.restore().step
    assert step >= 3  # step 3 was durable when step 4's save() began
    expected = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.Linear(1024, 256))
    fill(expected, step)
    assert same(dict(model.state_dict()), dict(expected.state_dict()))
