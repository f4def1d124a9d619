"""Hostile distributed (format v3) checkpoints: manifests with valid checksums whose per-rank trees,
tensor keys and chunk records lie, and tensor files of a rank missing or cut short. Every reader
(load, load with mmap, a single-process restore, each rank's part of a distributed restore, DCP's
loader on SavegameReader, and the CLI) gives one savegame error, never another exception or a hang;
restore("latest") falls back past the damaged newest checkpoint and an explicit restore of it leaves
the model untouched.
"""

from __future__ import annotations

import copy
import json
import pickle
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import savegame
from savegame.distributed.dcp_storage import EntryReader
from savegame.engine import reader
from savegame.engine.reader import verify_checkpoint
from savegame.errors import CorruptCheckpointError, SavegameError
from savegame.format import names as n
from savegame.storage.local import LocalStorage
from tests.damage import rewrite_manifest, set_entry
from tests.security import _hostile as h
from tests.security import _sharded as s

# DCP's loader, run here without a process group (no_dist), says so each time
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
NEW, OLD = s.NEW, s.OLD
PIECE = 20  # the entry of the chunked tensor's second row half (in rank 1's file)
STEP = 4  # tensor 4, state.optimizer.state[0].step: a float32 scalar (entry 8, rank 1's file)


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """(run directory, model weights of the previous checkpoint (step 6), the newest's chunked tensor)."""
    run = tmp_path_factory.mktemp("sharded") / "run"
    whole = s.make_run(run)
    return run, dict(savegame.load(run / OLD)["state"]["model"]), whole


@pytest.fixture
def run(base, tmp_path):
    return s.copy_run(base[0], tmp_path / "run")


def at(*path_and_value: Any):
    """Set the member at ``path`` of the stored manifest (delete it if the value is ``DROP``)."""
    *path, value = path_and_value

    def mutate(doc):
        node = doc
        for key in path[:-1]:
            node = node[key]
        if value is DROP:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return mutate


DROP = object()
T, R, W = n.M_TENSORS, n.M_RANKS, n.M_WORLD


def record(**fields: Any):
    """Change the chunk record of tensor 0."""
    def mutate(doc):
        doc[T][n.T_CHUNKS][0].update(fields)
    return mutate


def piece(i: int, value: Any):
    def mutate(doc):
        doc[T][n.T_CHUNKS][0]["chunks"][i] = value
    return mutate


def entry(column: str, e: int, value: Any):
    def mutate(doc):
        sums = doc[n.M_ENTRIES][n.E_SUM]
        if column == n.E_SUM and isinstance(sums, str):  # stored as one string, 16 hex digits an entry
            doc[n.M_ENTRIES][n.E_SUM] = sums[:16 * e] + value + sums[16 * e + 16:]
        else:
            set_entry(doc, column, e, value)
    return mutate


def both(*mutations):
    def mutate(doc):
        for m in mutations:
            m(doc)
    return mutate


def one_entry_as_chunks(count: int):
    """Tensor STEP as ``count`` pieces, all its one entry: gigabytes from a file of megabytes."""
    def mutate(doc):
        e = doc[T][n.T_ENTRY][STEP]
        set_entry(doc, n.E_SHAPE, e, [1])
        doc[T][n.T_CHUNKS].append({"tensor": STEP, "shape": [count], "chunks": [[e, [i]] for i in range(count)]})
    return mutate


def many_chunked(doc):
    """Every scalar tensor (the optimizer's steps) as 4096 one-element pieces, each an entry of its own
    (its bytes, listed 4096 times): a quadratic overlap check hangs on it."""
    entries = doc[n.M_ENTRIES]
    columns = (n.E_FILE, n.E_DTYPE, n.E_SHAPE, n.E_START, n.E_END)
    for column in columns:  # expand columns stored as one value
        if not isinstance(entries[column], list):
            entries[column] = [entries[column]] * len(entries[n.E_START])
    for j in [j for j, e in enumerate(doc[T][n.T_ENTRY]) if entries[n.E_SHAPE][e] == []]:
        e = doc[T][n.T_ENTRY][j]
        entries[n.E_SHAPE][e] = [1]
        first = len(entries[n.E_START])
        for column in columns:
            entries[column] += [entries[column][e]] * 4095
        entries[n.E_SUM] += entries[n.E_SUM][16 * e:16 * e + 16] * 4095
        pieces = [[e, [0]]] + [[first + i, [i + 1]] for i in range(4095)]
        doc[T][n.T_CHUNKS].append({"tensor": j, "shape": [4096], "chunks": pieces})


def empty_of_shape(shape: list[int]):
    """Tensor 0 as one empty piece (entry PIECE, 0 bytes) of a tensor of ``shape``."""
    def mutate(doc):
        for column, value in ((n.E_SHAPE, [0] * len(shape)), (n.E_END, doc[n.M_ENTRIES][n.E_START][PIECE]),
                              (n.E_SUM, "2d06800538d394c2")):  # xxh3-64 of no bytes
            entry(column, PIECE, value)(doc)
        doc[T][n.T_ENTRY][0] = PIECE
        doc[T][n.T_CHUNKS][0] = {"tensor": 0, "shape": shape, "chunks": [[PIECE, [0] * len(shape)]]}
    return mutate


def rank_state(rank: int, value: Any):
    return lambda doc: doc[R][rank][n.TREE_STATE].__setitem__("loader", value)


DAMAGED = {
    # world_size
    "world_size '2'": at(W, "2"), "world_size 0": at(W, 0), "world_size 2**64": at(W, 2**64),
    "world_size true": at(W, True), "world_size 3 for 2 ranks": at(W, 3), "world_size missing": at(W, DROP),
    "world_size 1 for 2 ranks": at(W, 1),
    # ranks
    "ranks missing": at(R, DROP), "ranks a mapping": lambda doc: doc.__setitem__(R, dict(enumerate(doc[R]))),
    "a rank's tree a list": lambda doc: doc[R].__setitem__(1, [doc[R][1]]),
    "a rank's tree with an extra key": at(R, 1, "x", 1), "a rank's state a list": at(R, 1, n.TREE_STATE, []),
    "a rank's state missing": at(R, 1, n.TREE_STATE, DROP), "a rank's rng missing": at(R, 1, n.TREE_RNG, DROP),
    "a rank's rng a number": at(R, 1, n.TREE_RNG, 5), "a rank's torch rng a number": at(R, 1, n.TREE_RNG, "torch", 5),
    "a rank's state names a state by an int": at(R, 1, n.TREE_STATE, {"$dict": [[1, 2]]}),
    "a rank's tree refers to tensor 999": rank_state(1, {"$t": 999}),
    "a rank's tree refers to tensor -1": rank_state(1, {"$t": -1}),
    "a rank's tree refers to tensor 20 of 20": rank_state(0, {"$t": 20}),
    "a rank's tree holds a 400-digit complex": rank_state(1, {"$complex": [10**400, 0]}),
    # tensor keys
    "keys missing": at(T, n.T_KEY, DROP), "keys a str": at(T, n.T_KEY, "state.model.0.weight"),
    "a key repeated": lambda doc: doc[T][n.T_KEY].__setitem__(1, doc[T][n.T_KEY][0]),
    "a key an int": at(T, n.T_KEY, 3, 3), "a key null": at(T, n.T_KEY, 0, None),
    "one key short": lambda doc: doc[T][n.T_KEY].pop(), "one key too many": lambda doc: doc[T][n.T_KEY].append("x"),
    "a shared tensor keyed as rank 0's": at(T, n.T_KEY, 0, "rank0/state.model.0.weight"),
    "rank 1's torch RNG keyed for no rank": at(T, n.T_KEY, 19, "rankX/rng.torch"),
    "rank 1's torch RNG keyed as rank 0's": at(T, n.T_KEY, 19, "rank0/rng.torch'"),
    "rank 1's torch RNG keyed as a state": at(T, n.T_KEY, 19, "rank1/state.loader.x"),
    # chunk records
    "chunks missing": at(T, n.T_CHUNKS, DROP), "chunks a mapping": at(T, n.T_CHUNKS, {}),
    "a chunk record a number": at(T, n.T_CHUNKS, [5]), "a chunk record of tensor 999": record(tensor=999),
    "a chunk record of tensor -1": record(tensor=-1), "a chunk record of tensor '0'": record(tensor="0"),
    "a chunk record of tensor true": record(tensor=True),
    "two chunk records of one tensor": lambda doc: doc[T][n.T_CHUNKS].append(copy.deepcopy(doc[T][n.T_CHUNKS][0])),
    "a chunk record without shape": record(shape=None), "a chunk record of shape [128]": record(shape=[128]),
    "a chunk record without chunks": record(chunks=None), "a chunk record of no chunks": record(chunks=[]),
    "a chunk outside the tensor": piece(1, [PIECE, [9, 0]]), "a chunk past the last column": piece(1, [PIECE, [8, 1]]),
    "overlapping chunks": piece(1, [PIECE, [7, 0]]), "a gap between chunks": record(shape=[17, 8]),
    "a chunk of another dtype": entry(n.E_DTYPE, PIECE, "int32"),
    "a chunk of another rank": piece(1, [PIECE, [8]]), "a chunk with negative offsets": piece(1, [PIECE, [-8, 0]]),
    "a chunk at offset 2**63": piece(1, [PIECE, [2**63, 0]]), "a chunk at offset 2**62": piece(1, [PIECE, [2**62, 0]]),
    "a chunk at offset 1.5": piece(1, [PIECE, [1.5, 0]]), "a chunk at offset true": piece(1, [PIECE, [True, 0]]),
    "a chunk not a pair": piece(1, [PIECE]), "a chunk of entry 999": piece(1, [999, [8, 0]]),
    "a chunk of entry -1": piece(1, [-1, [8, 0]]), "a chunk of entry '20'": piece(1, ["20", [8, 0]]),
    "a tensor of shape [2**63, 8]": record(shape=[2**63, 8]), "a tensor of shape [2**62, 8]": record(shape=[2**62, 8]),
    "a tensor of shape [-16, 8]": record(shape=[-16, 8]), "a tensor of 70 dimensions": record(shape=[1] * 70),
    "an empty tensor of shape [0, 2**62, 2**62]": empty_of_shape([0, 2**62, 2**62]),
    "an empty tensor of shape [2**62, 0, 2**62]": empty_of_shape([2**62, 0, 2**62]),
    "10**5 chunks": record(chunks=[[0, [0, 0]]] * 10**5),
    "4096 pieces of one entry": one_entry_as_chunks(4096),
    "an entry as two chunks": record(chunks=[[0, [0, 0]], [0, [8, 0]]]),
    "the tensor's entry is not its first chunk": at(T, n.T_ENTRY, 0, PIECE),
    "the chunks in another order": lambda doc: doc[T][n.T_CHUNKS][0]["chunks"].reverse(),
    "a chunked tensor also a view": at(T, n.T_VIEWS, [{"tensor": 0, "dtype": "uint8", "shape": [4], "stride": [1],
                                                       "offset": 0}]),
    "a chunked tensor of uint8 also a view": both(
        at(T, n.T_VIEWS, [{"tensor": 0, "dtype": "float32", "shape": [2], "stride": [1], "offset": 0}]),
        *(entry(column, e, value) for e in (0, PIECE) for column, value in ((n.E_DTYPE, "uint8"), (n.E_SHAPE, [256]))),
        record(shape=[512], chunks=[[0, [0]], [PIECE, [256]]])),
    # entries and files
    "a chunk's entry past the end of its file": both(entry(n.E_START, PIECE, 10**6), entry(n.E_END, PIECE, 10**6 + 256)),
    "a chunk's entry in the other rank's file, past its end": entry(n.E_FILE, PIECE, 0),
    "a rank's file named for a third rank": at(n.M_FILES, 1, "tensors-00002.safetensors"),
    "one file for two ranks": at(n.M_FILES, [n.tensor_file(0)]),
}


def missing(ckpt: Path) -> None:
    (ckpt / n.tensor_file(1)).unlink()


def truncated(by: int):
    def damage(ckpt: Path) -> None:
        path = ckpt / n.tensor_file(1)
        path.write_bytes(path.read_bytes()[:-by])
    return damage


FILES = {"rank 1's file missing": missing, "rank 1's file short by 100 bytes": truncated(100),
         "rank 1's file emptied": lambda ckpt: (ckpt / n.tensor_file(1)).write_bytes(b""),
         "rank 1's file cut inside its header": truncated(9000)}


def check_damaged(run: Path, base: Any, out: Path, tensors: bool = True) -> None:
    """Every reader refuses the newest checkpoint with a savegame error, and restore falls back."""
    objs = s.model_and_optimizer()
    results = s.all_readers(run, out, objs)
    for key in ("load", "load_mmap", "rank0", "rank1", "rank0_of_3"):
        assert isinstance(results[key], CorruptCheckpointError), (key, results[key])
    if tensors:  # DCP's loader reads tensors only: a damaged rank tree is the restore's to refuse
        assert isinstance(results["dcp"], CorruptCheckpointError), results["dcp"]
    assert getattr(results["restore"], "step", None) == 6, results["restore"]  # fell back past the damaged one:
    assert all(torch.equal(objs["model"].state_dict()[k], v) for k, v in base[1].items())  # its bytes, not the newest's
    assert verify_checkpoint(LocalStorage(str(run)), NEW)
    assert results["verify"].exit_code == 1  # a finding (docs/cli.md); the others cannot read it: 2
    assert [results[c].exit_code for c in ("inspect", "inspect --json", "export")] == [2, 2, 2]
    objs = s.model_and_optimizer()
    with torch.no_grad():
        objs["model"][0].weight.zero_()
    with pytest.raises(CorruptCheckpointError):
        s.restore(run, objs, 9)
    assert not objs["model"][0].weight.any()  # refused before anything loaded


def test_the_base_checkpoint_is_intact_and_chunked(base, run, tmp_path):
    doc = s.stored(run / NEW)
    assert doc[n.M_VERSION] == 3 and doc[W] == 2 and len(doc[T][n.T_CHUNKS]) == 1
    assert doc[T][n.T_CHUNKS][0]["chunks"][1][0] == PIECE and doc[n.M_ENTRIES][n.E_FILE][PIECE] == 1
    assert doc[T][n.T_KEY][19] == "rank1/rng.torch" and doc[R][1][n.TREE_RNG]["torch"] == {"$t": 19}
    assert doc[T][n.T_KEY][STEP].endswith(".step") and doc[n.M_ENTRIES][n.E_SHAPE][doc[T][n.T_ENTRY][STEP]] == []
    results = s.all_readers(run, tmp_path / "out")
    assert not any(isinstance(v, SavegameError) for v in results.values()), results
    assert all(r.exit_code == 0 for r in (results["verify"], results["inspect"], results["export"]))
    weight = results["load"]["state"]["model"]["0.weight"]
    assert torch.equal(results["dcp"]["state.model.0.weight"], weight)
    assert torch.equal(results["rank1"].tree[n.TREE_STATE]["model"]["0.weight"], weight)
    assert s.restore(run, s.model_and_optimizer()).step == 9


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_hostile_v3_manifest_is_a_damaged_checkpoint(base, run, tmp_path, case):
    rewrite_manifest(run / NEW, DAMAGED[case])
    check_damaged(run, base, tmp_path / "out", tensors=not case.startswith("a rank's"))


@pytest.mark.parametrize("case", sorted(FILES))
def test_a_rank_file_missing_or_cut_is_a_damaged_checkpoint(base, run, tmp_path, case):
    FILES[case](run / NEW)
    check_damaged(run, base, tmp_path / "out")


# The check each case must reach (not an earlier one that happens to refuse it too).
REASON = {
    "overlapping chunks": "gap or overlap", "a gap between chunks": "gap or overlap",
    "a chunk of another dtype": "another dtype", "a chunk outside the tensor": "outside it",
    "a chunk past the last column": "outside it", "the tensor's entry is not its first chunk": "first chunk",
    "two chunk records of one tensor": "two chunk records", "a chunked tensor of uint8 also a view": "also described",
    "an empty tensor of shape [0, 2**62, 2**62]": "impossible shape",
    "an empty tensor of shape [2**62, 0, 2**62]": "impossible shape", "10**5 chunks": "malformed chunk record",
    "4096 pieces of one entry": "more than one chunk", "an entry as two chunks": "more than one chunk",
    "a chunk's entry past the end of its file": "truncated",
    "a chunk's entry in the other rank's file, past its end": "truncated",
    "a rank's tree refers to tensor 999": "out of range", "a rank's tree refers to tensor 20 of 20": "out of range",
    "a rank's torch rng a number": "rank 1: the torch RNG", "a rank's rng missing": "one state mapping per rank",
    "a shared tensor keyed as rank 0's": "the shared states hold tensor 0",
    "rank 1's torch RNG keyed for no rank": "rank 1's RNG hold tensor 19",
    "rank 1's torch RNG keyed as rank 0's": "rank 1's RNG hold tensor 19",
    "rank 1's torch RNG keyed as a state": "rank 1's RNG hold tensor 19",
}


@pytest.mark.parametrize("case", sorted(REASON))
def test_each_hostile_case_reaches_its_check(run, case):
    rewrite_manifest(run / NEW, DAMAGED[case])
    with pytest.raises(CorruptCheckpointError, match=REASON[case].replace("[", r"\[")):
        savegame.load(run / NEW)


def test_a_tensor_stored_in_chunks_loads_whole_with_its_bytes(base, run):
    """Regression: load() and a single-process restore assembled chunked tensors before reading their
    pieces, so the model got uninitialised memory."""
    whole = base[2]
    assert torch.equal(savegame.load(run / NEW)["state"]["model"]["0.weight"], whole)
    assert torch.equal(savegame.load(run / NEW, mmap=True)["state"]["model"]["0.weight"], whole)
    objs = s.model_and_optimizer()
    assert s.restore(run, objs).step == 9
    assert torch.equal(objs["model"][0].weight.detach(), whole)
    for rank in (0, 1):
        assert torch.equal(s.as_rank(run, rank).tree[n.TREE_STATE]["model"]["0.weight"], whole)


def test_thousands_of_chunks_per_tensor_are_checked_quickly(run):
    """Regression: the pairwise overlap check took 19 s for one tensor in 4,096 pieces (what FSDP on
    4,096 ranks writes); every scalar of the checkpoint so split would have hung every reader."""
    rewrite_manifest(run / NEW, many_chunked)
    started = time.perf_counter()
    tree = savegame.load(run / NEW)
    assert time.perf_counter() - started < 10  # about 1 s on 2 busy cores; the pairwise check took minutes
    step = tree["state"]["optimizer"]["state"][0]["step"]
    assert step.shape == (4096,) and bool((step == step[0]).all())


def terabyte_entry(doc):
    """Tensor 3 (state.model.2.bias, in rank 1's file of 9 KiB) claims 2**40 bytes."""
    e = doc[T][n.T_ENTRY][3]
    entry(n.E_SHAPE, e, [2**38])(doc)
    entry(n.E_END, e, doc[n.M_ENTRIES][n.E_START][e] + 2**40)(doc)


def test_an_entry_past_its_file_is_refused_before_anything_is_allocated(base, run):
    """Regression: load() and restore() allocated every entry (here a terabyte: RuntimeError from
    torch's allocator) before looking at the files' sizes; EntryReader allocated the piece first
    (MemoryError)."""
    rewrite_manifest(run / NEW, terabyte_entry)
    for mmap in (False, True):
        with pytest.raises(CorruptCheckpointError, match="truncated"):
            savegame.load(run / NEW, mmap=mmap)
    assert s.restore(run, s.model_and_optimizer()).step == 6
    storage = LocalStorage(str(run))
    doc = reader.read_manifest(storage, NEW)
    pieces = EntryReader(storage, NEW, doc, verify=True)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        pieces.read(doc[T][n.T_ENTRY][3])
    pieces.close()


def test_a_rank_refuses_an_entry_past_its_file_before_allocating(run):
    rewrite_manifest(run / NEW, terabyte_entry)
    assert isinstance(s.as_rank(run, 0), CorruptCheckpointError)


def zero_rank1_torch_rng(ckpt: Path) -> None:
    """Rank 1's torch RNG state all zeros, its checksums rewritten to match."""
    doc, values = s.read_all(ckpt)
    values[doc[T][n.T_ENTRY][doc[n.M_RANKS][1][n.TREE_RNG]["torch"]["$t"]]].zero_()
    s.rewrite(ckpt, doc, values, doc[n.M_ENTRIES][n.E_FILE])


def test_a_rank_torch_rng_state_the_generator_rejects_is_refused_before_the_model_changes(base, run):
    """Its bytes pass their checksum, but torch refuses the state (all zeros is no MT19937 state)."""
    zero_rank1_torch_rng(run / NEW)
    with pytest.raises(CorruptCheckpointError, match="rank 1: .*RNG"):
        savegame.load(run / NEW)
    assert verify_checkpoint(LocalStorage(str(run)), NEW)
    objs = s.model_and_optimizer()
    with torch.no_grad():
        objs["model"][0].weight.zero_()
    with pytest.raises(CorruptCheckpointError):
        s.restore(run, objs, 9)
    assert not objs["model"][0].weight.any()  # refused before its bytes were read into the model
    assert s.restore(run, s.model_and_optimizer()).step == 6


def test_a_rank_refuses_a_torch_rng_state_the_generator_rejects(run):
    zero_rank1_torch_rng(run / NEW)
    assert isinstance(s.as_rank(run, 1), CorruptCheckpointError)


def test_load_exposes_each_rank_s_own_tree(base, run, tmp_path):
    tree = savegame.load(run / NEW)
    ranks = tree["ranks"]
    assert len(ranks) == 2 and all(set(r) == {n.TREE_RNG, n.TREE_STATE} for r in ranks)
    assert all(set(r[n.TREE_STATE]) == {"loader"} for r in ranks)
    assert ranks[1][n.TREE_STATE]["loader"]["sampler"]["world_size"] == 2
    assert torch.equal(ranks[0][n.TREE_RNG]["torch"], tree[n.TREE_RNG]["torch"])  # the top level is rank 0's
    assert not torch.equal(ranks[0][n.TREE_RNG]["torch"], ranks[1][n.TREE_RNG]["torch"])  # seeded 100 + rank
    assert torch.equal(ranks[1][n.TREE_RNG]["torch"], s.as_rank(run, 1).tree[n.TREE_RNG]["torch"])
    torch.Generator().set_state(ranks[1][n.TREE_RNG]["torch"])  # a state torch takes
    mapped = savegame.load(run / NEW, mmap=True)["ranks"]
    assert torch.equal(mapped[1][n.TREE_RNG]["torch"], ranks[1][n.TREE_RNG]["torch"])
    with pytest.raises(TypeError):
        ranks[1][n.TREE_STATE]["loader"] = None  # read-only, as the rest of the tree
    with savegame.Checkpointer(tmp_path / "single", s.model_and_optimizer(), async_save=False) as ckpt:
        ckpt.save(1)
    assert savegame.load(tmp_path / "single")["ranks"] is None


def kind_of(path: Path) -> str:
    """What a file of a run directory is, from its bytes: JSON, JSON lines, a tensor file or the lock."""
    raw = path.read_bytes()
    if path.name == ".savegame.lock":
        pid, _ = raw.decode("ascii").split(" ", 1)
        assert pid.isdigit()
        return "lock"
    if path.suffix == ".safetensors":
        size = int.from_bytes(raw[:8], "little")
        assert isinstance(json.loads(raw[8:8 + size]), dict)  # the header; the rest is raw tensor bytes
        return "tensors"
    if path.suffix == ".jsonl":
        assert all(isinstance(json.loads(line), dict) for line in raw.splitlines())
        return "jsonl"
    assert isinstance(json.loads(raw), dict), path
    return "json"


def test_the_sharded_format_contains_no_pickle(base, run, tmp_path, monkeypatch):
    files = [p for p in run.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {n.MANIFEST, n.tensor_file(0), n.tensor_file(1), n.HISTORY_FILE}
    for path in files:
        raw = path.read_bytes()
        assert not raw.startswith(b"\x80") and not raw.startswith(b"PK\x03\x04"), path  # pickle, zip (torch.save)
        assert path.name != ".metadata" and path.suffix not in (".pt", ".pth", ".pkl", ".bin"), path
        assert kind_of(path) in ("json", "jsonl", "tensors", "lock")

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was read")

    for owner, attr in ((pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load"),
                        (torch.serialization, "load")):
        monkeypatch.setattr(owner, attr, refuse)
    unpickled.clear()
    assert torch.equal(savegame.load(run / NEW)["state"]["model"]["0.weight"], base[2])
    assert savegame.load(run / NEW, mmap=True)["ranks"][1]
    assert s.restore(run, s.model_and_optimizer()).step == 9
    assert not isinstance(s.as_rank(run, 1), SavegameError) and not isinstance(s.dcp_read(run), SavegameError)
    assert h.run_cli(["verify", str(run)]).exit_code == 0
    assert h.run_cli(["export", str(run / NEW), "--to", str(tmp_path / "w.safetensors")]).exit_code == 0
    assert unpickled == []  # no class was looked up by any unpickler, however it was reached


unpickled: list[str] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "pickle.find_class":
        unpickled.append(f"{args[0]}.{args[1]}")


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one only records

# Structure-aware fuzzing of the v3 members: a random JSON-ish value put at a place inside
# world_size, ranks, tensors.key or tensors.chunks (or a value moved there from another such place).
V3_ROOTS = ((W,), (R,), (T, n.T_KEY), (T, n.T_CHUNKS), (T, n.T_ENTRY))
INTS = [-1, 0, 1, 2, 3, 7, 8, 16, 19, 20, 21, 2**31, 2**62, 2**63, 2**64, 10**30]
json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.sampled_from(INTS), st.integers(-3, 40), st.sampled_from([0.5, -0.0, 1e308]),
              st.sampled_from(["", "rng", "state", "$t", "state.model.0.weight", "rank1/rng.torch", "uint8"])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(
        st.sampled_from(["tensor", "shape", "chunks", "rng", "state", "$t", "$dict", "$tuple", "x"]), inner,
        max_size=3)),
    max_leaves=12)
v3_action = st.one_of(st.tuples(st.just("set"), json_value), st.tuples(st.just("move"), st.integers(0)),
                      st.tuples(st.just("drop"), st.none()))


def v3_places(doc: dict[str, Any]) -> list[tuple[Any, ...]]:
    out = []
    for root in V3_ROOTS:
        node = doc
        for key in root:
            node = node.get(key, DROP) if isinstance(node, dict) else DROP
        if node is not DROP:  # not dropped by an earlier move
            out += [root + p for p in fuzz_places(node)]
    return out


def fuzz_places(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in children:
        if not (isinstance(value, list) and len(value) > 30):  # not every word of an RNG state
            out += fuzz_places(value, (*prefix, key))
        else:
            out.append((*prefix, key))
    return out


def apply_moves(doc: dict[str, Any], moves: list[tuple[int, tuple[str, Any]]]) -> None:
    for choice, (kind, arg) in moves:
        where = v3_places(doc)
        if not where:
            return
        path = where[choice % len(where)]
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if kind == "set":
            parent[path[-1]] = json.loads(json.dumps(arg))
        elif kind == "move":
            source = doc
            for key in where[arg % len(where)]:
                source = source[key]
            parent[path[-1]] = json.loads(json.dumps(source))
        elif path[-1] in (W, R) or path[:-1] == (T,):
            del parent[path[-1]]
        else:
            parent.pop(path[-1])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow])
@given(moves=st.lists(st.tuples(st.integers(min_value=0), v3_action), min_size=1, max_size=3))
def test_fuzzed_v3_members_give_savegame_errors_only(base, tmp_path_factory, moves):
    run = s.copy_run(base[0], tmp_path_factory.mktemp("case") / "run")
    rewrite_manifest(run / NEW, lambda doc: apply_moves(doc, moves))
    problems = verify_checkpoint(LocalStorage(str(run)), NEW)
    results = {"load": h.attempt(lambda: savegame.load(run / NEW)),
               "load_mmap": h.attempt(lambda: savegame.load(run / NEW, mmap=True)),
               "restore": h.attempt(lambda: s.restore(run, s.model_and_optimizer())),
               "rank0": s.as_rank(run, 0), "rank1": s.as_rank(run, 1), "dcp": s.dcp_read(run),
               "verify": h.run_cli(["verify", str(run)])}
    assert getattr(results["restore"], "step", None) in (6, 9), results["restore"]
    if problems:  # verify's verdict is the readers': a damaged newest checkpoint is refused, and skipped
        assert results["verify"].exit_code == 1
        assert results["restore"].step == 6
        assert all(isinstance(results[k], CorruptCheckpointError) for k in ("load", "load_mmap", "rank0", "rank1"))


def test_the_fuzzer_reaches_every_v3_member(base):
    places = v3_places(s.stored(base[0] / NEW))
    assert {p[:2] for p in places} >= {(W,), (R, 0), (R, 1), (T, n.T_KEY), (T, n.T_CHUNKS)}
    assert (T, n.T_CHUNKS, 0, "chunks", 1, 1, 0) in places  # an offset of a piece
    assert (R, 1, n.TREE_STATE, "loader", "sampler", "world_size") in places
