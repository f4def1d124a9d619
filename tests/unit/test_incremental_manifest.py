"""The compact v4 manifest (issue 17): checksums as base64 of their 16 bytes, ``end`` left out.

Both save bytes on a checkpoint of many tiny tensors (the 1% bound of full training); the
first v4 form (32 hex digits an entry, ``end`` stored) is read as well (tests/compat/data/v4),
and a malformed column is refused, never misread.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import savegame
from savegame.engine.reader import verify_checkpoint
from savegame.errors import CorruptCheckpointError
from savegame.format import manifest
from savegame.format import names as n
from savegame.storage import LocalStorage


class Holder:
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.tensors = state


def saved(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    state = {"a": torch.arange(10.0), "b": torch.ones(3, 5, dtype=torch.bfloat16), "c": torch.zeros(0)}
    with savegame.Checkpointer(tmp_path / "run", {"s": Holder(state)}, incremental=True) as ckpt:
        ckpt.save(1)
    folder = next((tmp_path / "run").glob(n.CHECKPOINT_PREFIX + "*"))
    return folder, state


def body_of(folder: Path) -> dict[str, object]:
    raw = (folder / n.MANIFEST).read_bytes()
    doc: dict[str, object] = json.loads(raw)
    doc.pop(n.M_CHECKSUM)
    return doc


def rewrite(folder: Path, doc: dict[str, object]) -> None:
    (folder / n.MANIFEST).write_bytes(manifest.dumps(doc))


def test_v4_column_is_base64_without_end(tmp_path: Path) -> None:
    folder, state = saved(tmp_path)
    entries = body_of(folder)[n.M_ENTRIES]
    assert isinstance(entries, dict) and n.E_END not in entries
    count = len(entries[n.E_START])
    assert len(entries[n.E_SUM]) == 4 * math.ceil(16 * count / 3)
    loaded = savegame.load(tmp_path / "run")["state"]["s"]
    for key, value in state.items():
        assert torch.equal(loaded[key], value) and loaded[key].dtype == value.dtype
    assert verify_checkpoint(LocalStorage(folder.parent), folder.name) == []


def test_first_v4_form_still_reads(tmp_path: Path) -> None:
    folder, state = saved(tmp_path)
    doc = manifest.loads((folder / n.MANIFEST).read_bytes(), "test")  # expanded: hex and end
    old = manifest.compact(doc)
    old[n.M_ENTRIES] = dict(old[n.M_ENTRIES], **{n.E_SUM: "".join(doc[n.M_ENTRIES][n.E_SUM]),
                                                  n.E_END: doc[n.M_ENTRIES][n.E_END]})
    rewrite(folder, old)
    assert torch.equal(savegame.load(tmp_path / "run")["state"]["s"]["a"], state["a"])
    assert verify_checkpoint(LocalStorage(folder.parent), folder.name) == []


@pytest.mark.parametrize("damage", ["bad_base64", "short", "v2_without_end"])
def test_malformed_column_refused(tmp_path: Path, damage: str) -> None:
    folder, _ = saved(tmp_path)
    doc = body_of(folder)
    entries = dict(doc[n.M_ENTRIES])  # type: ignore[call-overload]
    if damage == "bad_base64":
        entries[n.E_SUM] = "!" + entries[n.E_SUM][1:]
    elif damage == "short":
        entries[n.E_SUM] = entries[n.E_SUM][:-4]
    else:
        doc[n.M_VERSION] = n.FORMAT_VERSION
    doc[n.M_ENTRIES] = entries
    rewrite(folder, doc)
    with pytest.raises(CorruptCheckpointError):
        manifest.loads((folder / n.MANIFEST).read_bytes(), "test")
