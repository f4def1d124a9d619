"""Compressed (v5) checkpoints with valid checksums but hostile content: savegame errors only, and fallback.

Each case rewrites the newest checkpoint so that every checksum still matches (the manifest's own,
the entry's over its stored bytes), so only the content checks stand between it and the reader:
a raw size zstd cannot produce (a bomb), a size that is not whole elements, an unknown codec, a
frame that does not decode, one that decodes to fewer bytes than declared, one whose header
declares more. ``restore("latest")`` must fall back to the older checkpoint, and a restore of the
hostile step itself must leave the model's tensors untouched.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import xxhash
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import savegame
from savegame.engine.reader import read_manifest, verify_checkpoint
from savegame.errors import CorruptCheckpointError
from savegame.format import names as n
from savegame.storage.local import LocalStorage
from tests.damage import data_byte, rewrite_manifest, set_entry
from tests.security import _hostile as h
from tests.security import test_fuzz_structure as fuzz


def objects() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    with torch.no_grad():
        model.weight.copy_(torch.randn(64, 64).mul(8).round().div(256))  # compressible
    return {"model": model}


def make_run(path) -> dict:
    objs = objects()
    with savegame.Checkpointer(path, objs, compression="zstd", async_save=False) as ckpt:
        ckpt.save(1)
        old = {k: v.clone() for k, v in objs["model"].state_dict().items()}
        with torch.no_grad():
            objs["model"].weight.add_(1.0)
        ckpt.save(2)
    return old


def weight_entry(run) -> int:
    doc = read_manifest(LocalStorage(run), h.NEW)
    e = doc[n.M_TENSORS][n.T_ENTRY][doc[n.M_TREE][n.TREE_STATE]["model"]["weight"]["$t"]]
    assert doc[n.M_ENTRIES][n.E_CODEC][e] != n.CODEC_RAW
    return e


def replace_stored(run, e: int, blob: bytes) -> None:
    """Put ``blob`` (at most the entry's stored length, zero-padded) in place of entry ``e``'s stored bytes
    and give the manifest its checksum: the damage is then invisible to every checksum."""
    path, offset = data_byte(run / h.NEW, e)
    doc = read_manifest(LocalStorage(run), h.NEW)
    length = doc[n.M_ENTRIES][n.E_END][e] - doc[n.M_ENTRIES][n.E_START][e]
    assert len(blob) <= length
    blob = blob + bytes(length - len(blob))
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(blob)

    def mutate(doc):
        sums = doc[n.M_ENTRIES][n.E_SUM]
        doc[n.M_ENTRIES][n.E_SUM] = sums[:16 * e] + xxhash.xxh3_64_hexdigest(blob) + sums[16 * e + 16:]
    rewrite_manifest(run / h.NEW, mutate)


def stored(run, e: int) -> bytes:
    path, offset = data_byte(run / h.NEW, e)
    doc = read_manifest(LocalStorage(run), h.NEW)
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(doc[n.M_ENTRIES][n.E_END][e] - doc[n.M_ENTRIES][n.E_START][e])


RAW = 64 * 64 * 4


def bomb(run, e):  # 1 TiB declared from a few KB, shape to match
    rewrite_manifest(run / h.NEW, lambda doc: (set_entry(doc, n.E_RAW, e, 2**40),
                                                set_entry(doc, n.E_SHAPE, e, [2**18, 2**20])))


def frame_declares_more(run, e):  # the frame header claims more than the manifest (zstandard would allocate it)
    replace_stored(run, e, zstandard.ZstdCompressor().compress(bytes(RAW * 8))[:64])


CASES = {
    "raw size beyond what zstd can produce": bomb,
    "raw size not whole elements": lambda run, e: rewrite_manifest(run / h.NEW,
                                                                    lambda doc: set_entry(doc, n.E_RAW, e, RAW - 1)),
    "unknown codec": lambda run, e: rewrite_manifest(run / h.NEW, lambda doc: set_entry(doc, n.E_CODEC, e, "zstd9")),
    "raw entry called compressed": lambda run, e: rewrite_manifest(
        run / h.NEW, lambda doc: set_entry(doc, n.E_CODEC, e, n.CODEC_RAW)),
    "corrupt frame": lambda run, e: replace_stored(run, e, bytes(b ^ 0x5A for b in stored(run, e))),
    "corrupt frame body": lambda run, e: replace_stored(run, e, stored(run, e)[:20] + bytes(len(stored(run, e)) - 20)),
    "frame of fewer bytes": lambda run, e: replace_stored(run, e, zstandard.ZstdCompressor().compress(bytes(RAW - 4))),
    "frame of fewer bytes, no size": lambda run, e: replace_stored(
        run, e, zstandard.ZstdCompressor(write_content_size=False).compress(bytes(RAW - 4))),
    "frame declaring more": frame_declares_more,
    "stored range far past the file": lambda run, e: rewrite_manifest(
        run / h.NEW, lambda doc: set_entry(doc, n.E_END, e, 2**56)),
    "grouped codec on a plain frame of other bytes": lambda run, e: replace_stored(
        run, e, zstandard.ZstdCompressor().compress(bytes(RAW))),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile_zstd") / "run"
    return path, make_run(path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_compressed_entry_is_a_damaged_checkpoint_and_restore_falls_back(base, tmp_path, case):
    run = shutil.copytree(base[0], tmp_path / "run")
    CASES[case](run, weight_entry(run))
    if case == "grouped codec on a plain frame of other bytes":  # decodes fine: the data is just other bytes
        assert savegame.load(run / h.NEW)["state"]["model"]["weight"].abs().sum() == 0
        return
    for mmap in (False, True):
        with pytest.raises(CorruptCheckpointError):
            savegame.load(run / h.NEW, mmap=mmap)
    objs = objects()
    with torch.no_grad():
        objs["model"].weight.fill_(7.0)
        objs["model"].bias.fill_(-7.0)
    with savegame.Checkpointer(run, objs) as ckpt:
        with pytest.raises(CorruptCheckpointError):
            ckpt.restore(2)  # the hostile step itself: refused with the model untouched
        assert bool((objs["model"].weight == 7.0).all()) and bool((objs["model"].bias == -7.0).all())
        assert ckpt.restore().step == 1  # "latest" falls back past it
    assert all(torch.equal(v, base[1][k]) for k, v in objs["model"].state_dict().items())
    assert verify_checkpoint(LocalStorage(run), h.OLD) == []
    (tmp_path / "out").mkdir()
    for args in h.cli_commands(run, tmp_path / "out"):  # exit 0, 1 or 2 with one error line, never a traceback
        h.run_cli(args)
    if case in ("corrupt frame", "corrupt frame body", "frame of fewer bytes", "frame of fewer bytes, no size",
                "frame declaring more"):
        return  # checksums hold: verify (which never decompresses) passes, as documented
    assert verify_checkpoint(LocalStorage(run), h.NEW)
    assert h.run_cli(["verify", str(run)]).exit_code == 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow])
@given(moves=st.lists(st.tuples(st.integers(min_value=0), fuzz.action), min_size=1, max_size=3))
def test_fuzzed_entry_tables_of_compressed_checkpoints_give_savegame_errors_only(base, tmp_path_factory, moves):
    """The structure fuzzer of test_fuzz_structure.py, aimed at the entry table (codec, raw, ranges, sums)."""
    run = shutil.copytree(base[0], tmp_path_factory.mktemp("case") / "run")
    rewrite_manifest(run / h.NEW, lambda doc: fuzz.mutate(doc[n.M_ENTRIES], moves))
    verify_checkpoint(LocalStorage(run), h.NEW)
    for mmap in (False, True):
        h.attempt(lambda mmap=mmap: savegame.load(run / h.NEW, mmap=mmap))  # a result or a SavegameError only
    objs = objects()
    with savegame.Checkpointer(run, objs) as ckpt:
        assert ckpt.restore().step in (1, 2)  # at worst the intact older checkpoint


@pytest.fixture(scope="module")
def incremental_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile_zstd_incremental") / "run"
    objs = objects()
    with savegame.Checkpointer(path, objs, compression="zstd", incremental=True, async_save=False) as ckpt:
        ckpt.save(1)
        with torch.no_grad():
            objs["model"].bias.add_(1.0)
        ckpt.save(2)
    return path


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow])
@given(moves=st.lists(st.tuples(st.integers(min_value=0), fuzz.action), min_size=1, max_size=3), whole=st.booleans())
def test_fuzzed_incremental_compressed_manifests_never_make_the_next_save_reference_bad_bytes(
        incremental_base, tmp_path_factory, moves, whole):
    """A hostile newest manifest (packs, content identities) is read as damage or as what it says, and the
    next incremental save, after restore(), verifies (400 examples clean once; 25 in the suite)."""
    run = shutil.copytree(incremental_base, tmp_path_factory.mktemp("case") / "run")
    rewrite_manifest(run / h.NEW, lambda doc: fuzz.mutate(doc if whole else doc[n.M_ENTRIES], moves))
    for mmap in (False, True):
        h.attempt(lambda mmap=mmap: savegame.load(run / h.NEW, mmap=mmap))
    with savegame.Checkpointer(run, objects(), incremental=True, compression="zstd") as ckpt:
        if not hasattr(h.attempt(ckpt.restore), "step"):  # (a state that no longer fits the model: refused)
            ckpt.restore(1)
        ckpt.save(3)
    assert verify_checkpoint(LocalStorage(run), "step-0000000003") == []
