"""Every format version ever released still loads, with exactly its content."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import savegame
from tests.compat.golden import expected_state

DATA = Path(__file__).with_name("data")


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and (a == b).all()
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_golden_checkpoint_loads_exactly(version):
    tree = savegame.load(DATA / version / "step-0000000007")
    assert tree["step"] == 7 and tree["epoch"] == 1 and tree["metrics"] == {"loss": 0.25}
    assert tree["extra"] == {"golden": True}
    assert same(dict(tree["state"]), expected_state())
    model = tree["state"]["model"]
    assert model["w"].data_ptr() == model["tied"].data_ptr()  # shared storage survives
    model["w"][1, 0] = -1.0
    assert model["row"][0].item() == -1.0


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_golden_checkpoint_verifies_and_a_flipped_byte_is_caught(version, tmp_path):
    import shutil

    from savegame.engine import reader
    from savegame.storage import LocalStorage
    from tests.damage import flip_data_byte

    shutil.copytree(DATA / version, tmp_path / version)
    storage = LocalStorage(tmp_path / version)
    assert reader.verify_checkpoint(storage, "step-0000000007") == []
    flip_data_byte(tmp_path / version / "step-0000000007", 1)
    assert reader.verify_checkpoint(storage, "step-0000000007")


def test_every_format_version_has_a_golden_file():
    from savegame.format.names import READABLE_VERSION

    assert sorted(p.name for p in DATA.iterdir() if p.name.startswith("v")) == \
        [f"v{v}" for v in range(1, READABLE_VERSION + 1)]  # v3 (distributed): test_golden_v3.py


@pytest.mark.parametrize("step", [7, 8])
def test_golden_v4_incremental_checkpoints_load_exactly_from_one_shared_pack(step):
    from savegame.engine.reader import read_manifest
    from savegame.format import names as n
    from savegame.storage import LocalStorage

    name = f"step-{step:010d}"
    tree = savegame.load(DATA / "v4" / name)
    assert tree["step"] == step and same(dict(tree["state"]), expected_state())
    doc = read_manifest(LocalStorage(DATA / "v4"), name)
    assert doc[n.M_VERSION] == 4 and doc[n.M_FILES] == [f"data/{p.name}" for p in (DATA / "v4" / "data").iterdir()]


def test_golden_v4_a_flipped_byte_of_the_shared_pack_is_caught_in_both_checkpoints(tmp_path):
    import shutil

    from savegame.engine import reader
    from savegame.storage import LocalStorage

    shutil.copytree(DATA / "v4", tmp_path / "v4")
    storage = LocalStorage(tmp_path / "v4")
    assert all(reader.verify_checkpoint(storage, f"step-{s:010d}") == [] for s in (7, 8))
    pack = next((tmp_path / "v4" / "data").iterdir())
    raw = bytearray(pack.read_bytes())
    raw[-1] ^= 0xFF
    pack.write_bytes(bytes(raw))
    assert all(reader.verify_checkpoint(storage, f"step-{s:010d}") for s in (7, 8))


def test_golden_v5_compressed_checkpoint_loads_exactly_with_every_codec():
    from savegame.engine.reader import read_manifest
    from savegame.format import names as n
    from savegame.storage import LocalStorage
    from tests.compat.golden import expected_compressed_state

    for mmap in (False, True):
        tree = savegame.load(DATA / "v5" / "step-0000000007", mmap=mmap)
        assert tree["step"] == 7 and same(dict(tree["state"]), expected_compressed_state())
    doc = read_manifest(LocalStorage(DATA / "v5"), "step-0000000007")
    assert doc[n.M_VERSION] == 5 and set(doc[n.M_ENTRIES][n.E_CODEC]) == {"raw", "zstd", "zstd+bytegroup"}


def test_golden_v5_a_flipped_byte_of_a_compressed_entry_is_caught_without_decompressing(tmp_path, monkeypatch):
    import shutil

    from savegame.engine import reader
    from savegame.format import compression
    from savegame.storage import LocalStorage
    from tests.damage import flip_data_byte

    shutil.copytree(DATA / "v5", tmp_path / "v5")
    storage = LocalStorage(tmp_path / "v5")
    monkeypatch.setattr(compression, "unpack_into", None)  # verify reads stored bytes only: never calls it
    assert reader.verify_checkpoint(storage, "step-0000000007") == []
    flip_data_byte(tmp_path / "v5" / "step-0000000007", 10)  # the plain zstd entry
    assert "checksum mismatch in entry 10" in " ".join(reader.verify_checkpoint(storage, "step-0000000007"))


def test_readers_of_versions_1_to_4_refuse_a_v5_checkpoint_by_its_version(monkeypatch):
    """Older savegames accept format_version up to their READABLE_VERSION (4) and nothing else: a v5
    manifest is refused by that rule before any entry is read, so none can misread a compressed entry."""
    from savegame.errors import CorruptCheckpointError
    from savegame.format import manifest
    from savegame.format import names as n

    raw = (DATA / "v5" / "step-0000000007" / "manifest.json").read_bytes()
    assert manifest.loads(raw, "v5")[n.M_VERSION] == 5
    monkeypatch.setattr(n, "READABLE_VERSION", 4)  # the rule as savegame 1..4 apply it
    with pytest.raises(CorruptCheckpointError, match="format version 5 is not supported"):
        manifest.loads(raw, "v5")


@pytest.mark.parametrize("step", [7, 8])
def test_golden_v5_incremental_compressed_checkpoints_load_exactly_from_one_shared_pack(step):
    from savegame.engine.reader import read_manifest
    from savegame.format import names as n
    from savegame.storage import LocalStorage
    from tests.compat.golden import expected_compressed_state

    run = DATA / "v5" / "incremental"
    name = f"step-{step:010d}"
    for mmap in (False, True):
        tree = savegame.load(run / name, mmap=mmap)
        assert tree["step"] == step and same(dict(tree["state"]), expected_compressed_state())
    doc = read_manifest(LocalStorage(run), name)
    assert doc[n.M_VERSION] == 5 and doc[n.M_FILES] == [f"data/{p.name}" for p in (run / "data").iterdir()]
    assert len(doc[n.M_ENTRIES][n.E_CONTENT]) == len(doc[n.M_ENTRIES][n.E_START])
