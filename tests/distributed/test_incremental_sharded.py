"""A 2-rank incremental run with a frozen part: the frozen layer is written once (by one rank), every kept
checkpoint verifies and restores exactly on 2 ranks and in a plain process, and retention's packs are swept."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import savegame
from savegame.engine.reader import read_manifest, verify_checkpoint
from savegame.format import names as n
from savegame.run.directory import RunDir
from savegame.run.store import ContentStore
from savegame.storage import LocalStorage
from tests.distributed import launch

WORKER = str(Path(__file__).with_name("_worker.py"))

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="multi-process gloo tests run on Linux only")


def test_two_ranks_write_the_frozen_layer_once_and_restore_every_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    trained = launch.results(launch.run(WORKER, 2, "frozen", str(run), "train"))
    storage = LocalStorage(run)
    names = RunDir(storage).names()
    assert names == ["step-0000000002", "step-0000000003"]  # keep_last=2
    store = ContentStore(storage)
    sizes = {p: (run / p).stat().st_size for p in store.packs()}
    assert sum(1 for size in sizes.values() if size > 512 * 1024) == 1  # the frozen layer: written once
    assert set(sizes) == set().union(*store.referenced().values())  # step 1's own pack was swept
    for name in names:
        doc = read_manifest(storage, name)
        assert doc[n.M_VERSION] == n.PACKED_FORMAT_VERSION and doc[n.M_WORLD] == 2
        assert verify_checkpoint(storage, name) == []
        step = doc[n.M_STEP]
        loaded = savegame.load(run / name)["state"]["model"]
        assert loaded["1.weight"].flatten().tolist() == trained[0]["heads"][str(step)]
        assert float(loaded["0.weight"].double().sum()) == trained[0]["frozen"]
    again = launch.results(launch.run(WORKER, 2, "frozen", str(run), "read"))
    assert all(r["step"] == 3 and r["head"] == trained[0]["heads"]["3"] for r in again)
