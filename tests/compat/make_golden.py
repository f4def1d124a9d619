"""Write the golden checkpoint of the current format version into data/ (run by hand, then commit).

Never regenerate an existing version's files: they prove old checkpoints stay readable.
"""

from __future__ import annotations

import sys
from pathlib import Path

from savegame.engine.writer import prepare, snapshot, write_checkpoint
from savegame.format import names as n
from savegame.storage import LocalStorage
from tests.compat.golden import expected_state


def write_v4(out: Path) -> None:
    """Format v4 (incremental): step 7 writes a pack, step 8 (the same state) references it, writing nothing."""
    from savegame.engine.dedup import Dedup

    dedup, storage = Dedup(), LocalStorage(out)
    for step in (7, 8):
        tree = {n.TREE_STATE: expected_state(), n.TREE_RNG: {}, n.TREE_RUN: {"best": {}, "early_stopping": None}}
        prepared = prepare(tree, {n.M_STEP: step, n.M_EPOCH: 1, n.M_METRICS: {"loss": 0.25},
                                  n.M_EXTRA: {"golden": True}, n.M_TIME: 0.0, n.M_PINNED: False})
        prepared.reuse = dedup.apply(prepared.plan, 1 << 30)
        dedup.committed(write_checkpoint(storage, f"step-{step:010d}", prepared, snapshot(prepared, None)))


def write_v5(out: Path) -> None:
    """Format v5 (compression="zstd"): entries stored raw, zstd and zstd+bytegroup in one file."""
    from tests.compat.golden import expected_compressed_state

    tree = {n.TREE_STATE: expected_compressed_state(), n.TREE_RNG: {}, n.TREE_RUN: {"best": {}, "early_stopping": None}}
    prepared = prepare(tree, {n.M_STEP: 7, n.M_EPOCH: 1, n.M_METRICS: {"loss": 0.25}, n.M_EXTRA: {"golden": True},
                              n.M_TIME: 0.0, n.M_PINNED: False})
    prepared.compression = "zstd"
    write_checkpoint(LocalStorage(out), "step-0000000007", prepared, snapshot(prepared, None))


def write_v5_incremental(out: Path) -> None:
    """Format v5 with packs (compression="zstd", incremental=True): step 8 references step 7's entries."""
    from savegame.engine.dedup import Dedup
    from tests.compat.golden import expected_compressed_state

    dedup, storage = Dedup(), LocalStorage(out)
    for step in (7, 8):
        tree = {n.TREE_STATE: expected_compressed_state(), n.TREE_RNG: {},
                n.TREE_RUN: {"best": {}, "early_stopping": None}}
        prepared = prepare(tree, {n.M_STEP: step, n.M_EPOCH: 1, n.M_METRICS: {"loss": 0.25},
                                  n.M_EXTRA: {"golden": True}, n.M_TIME: 0.0, n.M_PINNED: False})
        prepared.compression = "zstd"
        prepared.reuse = dedup.apply(prepared.plan, 1 << 30)
        dedup.committed(write_checkpoint(storage, f"step-{step:010d}", prepared, snapshot(prepared, None)))


if __name__ == "__main__":
    if sys.argv[1:] == ["v5/incremental"]:
        target = Path(__file__).with_name("data") / "v5" / "incremental"
        if target.exists():
            sys.exit(f"{target} exists: golden files are never regenerated")
        target.mkdir(parents=True)
        write_v5_incremental(target)
        sys.exit(f"wrote {target}")
    if sys.argv[1:] in (["v4"], ["v5"]):
        version = sys.argv[1]
        target = Path(__file__).with_name("data") / version
        if target.exists():
            sys.exit(f"{target} exists: golden files are never regenerated")
        target.mkdir(parents=True)
        (write_v4 if version == "v4" else write_v5)(target)
        sys.exit(f"wrote {target}")
    if sys.argv[1:] == ["v4"]:
        target = Path(__file__).with_name("data") / "v4"
        if target.exists():
            sys.exit(f"{target} exists: golden files are never regenerated")
        target.mkdir(parents=True)
        write_v4(target)
        sys.exit(f"wrote {target}")
    out = Path(__file__).with_name("data") / f"v{n.FORMAT_VERSION}"
    if out.exists():
        sys.exit(f"{out} exists: golden files are never regenerated")
    out.mkdir(parents=True)
    tree = {n.TREE_STATE: expected_state(), n.TREE_RNG: {}, n.TREE_RUN: {"best": {}, "early_stopping": None}}
    prepared = prepare(tree, {n.M_STEP: 7, n.M_EPOCH: 1, n.M_METRICS: {"loss": 0.25}, n.M_EXTRA: {"golden": True},
                              n.M_TIME: 0.0, n.M_PINNED: False})
    write_checkpoint(LocalStorage(out), "step-0000000007", prepared, snapshot(prepared, None))
    print(f"wrote {out}")
