"""Scale: every tensor file name the writer can produce is readable, and verify is linear in files."""

from __future__ import annotations

import pytest
import torch

import savegame
from savegame.engine import reader
from savegame.format import names as n
from savegame.storage.local import LocalStorage


@pytest.mark.parametrize("index", [0, 1, 99_999, 100_000, 100_001, 999_999, 1_000_000, 10**9])
def test_every_tensor_file_name_the_writer_makes_is_read_back(index):
    name = n.TENSOR_FILE.format(index=index)  # what the writer writes for file number ``index``
    assert n.tensor_file(index) == name
    assert n.tensor_file_index(name) == index


@pytest.mark.parametrize("name", ["tensors-0001.safetensors", "tensors-000001.safetensors",
                                  "tensors-+0001.safetensors", "tensors-00001.safetensors.tmp",
                                  "tensors-\u0661\u0662\u0663\u0664\u0665.safetensors", "../tensors-00001.safetensors"])
def test_other_spellings_are_not_tensor_files(name):
    assert n.tensor_file_index(name) is None


class CountingList(list):
    """A list that counts how many of its items are visited (iteration and indexing)."""

    visits = 0

    def __iter__(self):
        for item in super().__iter__():
            CountingList.visits += 1
            yield item

    def __getitem__(self, index):
        CountingList.visits += 1
        return super().__getitem__(index)


def test_verify_visits_the_entry_table_a_linear_number_of_times(tmp_path, monkeypatch):
    """One tensor per file (shard_bytes=1): checking which entries each file holds must not
    rescan the whole table per file (that was quadratic: 40,000 files took a minute)."""
    files = 60
    state = {f"t{i}": torch.full((2,), float(i)) for i in range(files)}

    class Flat:
        def state_dict(self):
            return state

        def load_state_dict(self, value):
            pass

    with savegame.Checkpointer(tmp_path, {"flat": Flat()}, async_save=False, shard_bytes=1) as ckpt:
        ckpt.save(1)
    read_manifest, counted = reader.read_manifest, []

    def counting(storage, name):
        doc = read_manifest(storage, name)
        doc[n.M_ENTRIES][n.E_FILE] = CountingList(doc[n.M_ENTRIES][n.E_FILE])
        counted.append(len(doc[n.M_FILES]))  # the state's tensors and the RNG states
        return doc

    monkeypatch.setattr(reader, "read_manifest", counting)
    CountingList.visits = 0
    assert reader.verify_checkpoint(LocalStorage(str(tmp_path)), "step-0000000001") == []
    assert counted[0] > files
    assert 0 < CountingList.visits <= 3 * counted[0]
