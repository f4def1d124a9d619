"""Hostile or random checkpoint files give a CorruptCheckpointError: never a crash, hang or huge allocation."""

from __future__ import annotations

import io
import json
import random
import shutil
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import savegame
from savegame.errors import CorruptCheckpointError
from savegame.format import manifest
from savegame.format.tensorfile import read_header

json_leaf = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
json_any = st.recursive(json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                        max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_manifest_bytes(raw):
    with pytest.raises(CorruptCheckpointError):
        manifest.loads(raw, "fuzz")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_tensor_file_headers(raw):
    try:
        read_header(io.BytesIO(raw), len(raw), "fuzz")
    except CorruptCheckpointError:
        pass


def test_header_claiming_a_huge_length_is_refused_without_allocating():
    raw = struct.pack("<Q", 2**62) + b"{}"
    with pytest.raises(CorruptCheckpointError, match="exceeds"):
        read_header(io.BytesIO(raw), len(raw), "fuzz")


@pytest.fixture(scope="module")
def valid_checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("valid")
    weight = torch.randn(4, 3)
    state = {"w": weight, "tied": weight, "col": weight[:, 1], "n": torch.tensor(3)}

    class Obj:
        def state_dict(self):
            return {"t": state, "meta": (1, "x", 2.5), 5: [None, True]}

        def load_state_dict(self, s):
            pass

    with savegame.Checkpointer(run, {"obj": Obj()}, async_save=False) as ckpt:
        ckpt.save(1)
    return run / "step-0000000001"


def paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from paths(v, (*prefix, i))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(choice=st.integers(min_value=0), value=json_any)
def test_structurally_mutated_manifests_with_valid_checksums(valid_checkpoint, tmp_path_factory, choice, value):
    """The checksum is recomputed, so the structure checks themselves are fuzzed."""
    doc = json.loads((valid_checkpoint / "manifest.json").read_bytes())
    doc.pop("manifest_crc32")
    all_paths = [p for p in paths(doc) if p]
    target = all_paths[choice % len(all_paths)]
    node = doc
    for key in target[:-1]:
        node = node[key]
    node[target[-1]] = value
    work = tmp_path_factory.mktemp("mut") / "step-0000000001"
    shutil.copytree(valid_checkpoint, work)
    (work / "manifest.json").write_bytes(manifest.dumps(doc))
    try:
        savegame.load(work)
    except CorruptCheckpointError:
        pass


def test_every_random_byte_flip_in_a_tensor_file_is_caught(valid_checkpoint, tmp_path):
    rng = random.Random(7)
    source = valid_checkpoint / "tensors-00000.safetensors"
    for trial in range(40):
        work = tmp_path / f"t{trial}" / "step-0000000001"
        shutil.copytree(valid_checkpoint, work)
        data = bytearray(source.read_bytes())
        pos = rng.randrange(len(data))
        data[pos] ^= 1 << rng.randrange(8)
        (work / "tensors-00000.safetensors").write_bytes(bytes(data))
        with pytest.raises(CorruptCheckpointError):
            savegame.load(work)
