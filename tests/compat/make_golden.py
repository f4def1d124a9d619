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

if __name__ == "__main__":
    out = Path(__file__).with_name("data") / f"v{n.FORMAT_VERSION}"
    if out.exists():
        sys.exit(f"{out} exists: golden files are never regenerated")
    out.mkdir(parents=True)
    tree = {n.TREE_STATE: expected_state(), n.TREE_RNG: {}, n.TREE_RUN: {"best": {}, "early_stopping": None}}
    prepared = prepare(tree, {n.M_STEP: 7, n.M_EPOCH: 1, n.M_METRICS: {"loss": 0.25}, n.M_EXTRA: {"golden": True},
                              n.M_TIME: 0.0, n.M_PINNED: False})
    write_checkpoint(LocalStorage(out), "step-0000000007", prepared, snapshot(prepared, None))
    print(f"wrote {out}")
