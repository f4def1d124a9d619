"""Structure-aware fuzzing: a real manifest, decoded, with values changed (types, sizes, dtypes,
shapes, nesting) and written back with valid checksums. Every reader and every command either
succeeds or fails with one savegame error (the CLI: exit 1 or 2 and one ``savegame: error:`` line).

Bit flips are covered elsewhere (test_fuzz_readers.py): a checksum catches them before any of the
structure is looked at. Here the checksums are right, so the structure checks themselves are fuzzed.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from savegame.engine.reader import verify_checkpoint
from savegame.format import names as n
from savegame.storage.local import LocalStorage
from tests.damage import rewrite_manifest
from tests.security import _hostile as h

NUMBERS = [-1, 0, 1, 3, 624, 2**31, 2**63, -(2**63), 2**64 + 1, 10**30, 10**400, 0.5, -0.0, 1e308]
DTYPES = ["bfloat16", "qint8", "quint4x2", "bits8", "bits16", "float64", "uint8", "uint32", "complex128",
          "complex32", "float4_e2m1fn_x2", "int4", "float8_e8m0fnu", "bool", "float", "Tensor", "", "__class__"]
SHAPES = [[], [0], [1], [3], [624], [5056], [2**40, 2**40], [0, 2**70], [2**62, 4], [1] * 70, [-1], [3, None]]
TAGGED = [
    {"$complex": [10**400, 0]}, {"$complex": [1, 2, 3]}, {"$device": ""}, {"$device": "cuda:99999999999999999999"},
    {"$t": 999}, {"$t": -1}, {"$t": True}, {"$nd": 0}, {"$nd": 1}, {"$int": "ff"}, {"$int": "-"}, {"$int": "zz"},
    {"$size": [2**70]}, {"$size": [-1]}, {"$np": ["<f16", 1]}, {"$np": ["<i1", 300]}, {"$np": ["V8", 1]},
    {"$dtype": "qint8"}, {"$dtype": 5}, {"$dict": [[1, 2]]}, {"$dict": [[[1], 2]]}, {"$dict": [1]},
    {"$set": [[1]]}, {"$frozenset": [{"$set": []}]}, {"$tuple": 5}, {"$float": "nan"}, {"$float": []},
    {"$bytes": "!!"}, {"$bytes": 5}, {"$unknown": 1}, {"$t": 0, "x": 1}, {"$int": "f" * 5000},
    {"$dict": [[{"$int": "-" + "9" * 4000}, {"$int": "a" * 4000}]]}, [{"$int": "1" + "0" * 4000}, 0],
]
PLAIN = [None, True, False, "", "abc", "MT19937", [], {}, [1, 2], {"a": 1}, {"state": {}}, {"$tuple": []}]
hostile_value = st.one_of(
    st.sampled_from(NUMBERS), st.sampled_from(DTYPES), st.sampled_from(SHAPES), st.sampled_from(TAGGED),
    st.sampled_from(PLAIN), st.lists(st.sampled_from(NUMBERS), min_size=620, max_size=630),
)
# What to do at a chosen place: put a hostile value there, wrap what is there, move a value from
# elsewhere in the manifest there (structure-aware: plausible but misplaced), or drop it.
action = st.one_of(
    st.tuples(st.just("set"), hostile_value),
    st.tuples(st.just("wrap"), st.sampled_from(["list", "tuple", "dict", "deep"])),
    st.tuples(st.just("move"), st.integers(min_value=0)),
    st.tuples(st.just("drop"), st.none()),
)


def places(doc: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for key, value in doc.items():
            out += places(value, (*prefix, key))
    elif isinstance(doc, list) and len(doc) < 100:  # not every word of an RNG state
        for i, value in enumerate(doc):
            out += places(value, (*prefix, i))
    return out


def get(doc: Any, path: tuple) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def wrapped(value: Any, how: str) -> Any:
    if how == "deep":
        for _ in range(250):
            value = [value]
        return value
    return {"list": [value], "tuple": {"$tuple": [value]}, "dict": {"k": value}}[how]


def mutate(doc: dict[str, Any], moves: list[tuple[int, tuple[str, Any]]]) -> None:
    for choice, (kind, arg) in moves:
        where = places(doc)
        path = where[choice % len(where)]
        parent, key = get(doc, path[:-1]), path[-1]
        if kind == "set":
            parent[key] = json.loads(json.dumps(arg))  # a fresh copy
        elif kind == "wrap":
            parent[key] = wrapped(parent[key], arg)
        elif kind == "move":
            parent[key] = json.loads(json.dumps(get(doc, where[arg % len(where)])))
        elif isinstance(parent, dict):
            del parent[key]
        else:
            parent.pop(key)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "run"
    h.make_run(path)
    return path


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(moves=st.lists(st.tuples(st.integers(min_value=0), action), min_size=1, max_size=3))
def test_mutated_manifests_give_savegame_errors_only(base, tmp_path_factory, moves):
    run = shutil.copytree(base, tmp_path_factory.mktemp("case") / "run")
    rewrite_manifest(run / h.NEW, lambda doc: mutate(doc, moves))
    problems = verify_checkpoint(LocalStorage(str(run)), h.NEW)
    results = h.all_readers(run, run.parent / "out")
    for key in ("load", "restore", "restore_loose"):
        assert results[key] is not None  # restore falls back to the intact older checkpoint at worst
    if problems:  # verify's verdict is the restore's: a damaged newest checkpoint is skipped
        assert results["verify " + str(run)].exit_code == 1
        assert not hasattr(results["restore_loose"], "step") or results["restore_loose"].step == 1


def test_the_fuzzer_reaches_the_tree_and_the_tables(base):
    doc = json.loads((base / h.NEW / n.MANIFEST).read_bytes())
    reached = {path[0] for path in places(doc)}
    assert {n.M_TREE, n.M_ENTRIES, n.M_TENSORS, n.M_EXTRA, n.M_METRICS, n.M_FILES} <= reached
    assert any(path[:2] == (n.M_TREE, n.TREE_RNG) for path in places(doc))
