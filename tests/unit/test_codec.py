"""The exact JSON value codec: every supported value round-trips with its type."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from savegame.errors import CorruptCheckpointError, UnsupportedValueError
from savegame.format import codec


def roundtrip(value):
    tensors: list[torch.Tensor] = []

    def sink(t: torch.Tensor, path: str) -> int:
        tensors.append(t)
        return len(tensors) - 1

    encoded = codec.encode(value, sink)
    text = json.dumps(encoded, allow_nan=False)  # must be strict JSON
    return codec.decode(json.loads(text), tensors)


def same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


EXAMPLES = [
    None, True, False, 0, -1, 2**200, -(2**70), 1.5, -0.0, math.inf, -math.inf, "text", "",
    (1, 2), (), [1, (2, 3)], {"a": 1}, {0: "int key", 1.5: "float key", (1, 2): "tuple key"},
    {"$t": "a user key that looks like a tag"}, {None: 1, True: 2}, b"\x00\xffbytes", {1, 2, 3},
    frozenset({"x"}), torch.float32, torch.bfloat16, torch.device("cpu"), torch.Size([2, 3]), 1 + 2j,
    np.float64(0.25), np.int64(7), np.float32(1.5), np.bool_(True),
    {"param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0, 1]}], "state": {0: {"step": 3}}},
]


@pytest.mark.parametrize("value", EXAMPLES, ids=lambda v: type(v).__name__)
def test_examples_round_trip_exactly(value):
    assert same(roundtrip(value), value)


def test_nan_round_trips():
    out = roundtrip({"loss": math.nan})
    assert math.isnan(out["loss"])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.tuples(children, children)
    | st.dictionaries(st.text(max_size=5) | st.integers(), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_any_plain_tree_round_trips(value):
    assert same(roundtrip(value), value)


def test_tensors_and_arrays_go_to_the_sink():
    array = np.arange(5, dtype=np.uint32)
    out = roundtrip({"t": torch.ones(2), "a": array})
    assert torch.equal(out["t"], torch.ones(2))
    assert isinstance(out["a"], np.ndarray) and out["a"].dtype == np.uint32 and (out["a"] == array).all()


class Opaque:
    pass


@pytest.mark.parametrize("bad,path", [
    ({"model": {"layer": Opaque()}}, "model.layer"),
    ({"opt": [1, {"fn": print}]}, "opt[1].fn"),
    ({"a": np.array(["s"], dtype=object)}, "a"),
])
def test_unsupported_values_name_their_key_path(bad, path):
    with pytest.raises(UnsupportedValueError, match=path.replace("[", r"\[").replace("]", r"\]")):
        codec.encode(bad, lambda t, p: 0)


@pytest.mark.parametrize("doc", [
    {"$t": 5}, {"$t": "x"}, {"$tuple": 3}, {"$dict": [[1]]}, {"$float": "big"}, {"$bytes": "!!"},
    {"$dtype": "not_a_dtype"}, {"$dtype": "nn"}, {"$size": [-1]}, {"$np": ["O", 1]}, {"$unknown": 1, "x": 2},
    {"$set": [[1]]}, {"$complex": [1]}, {"$device": "nowhere:9"},
])
def test_malformed_trees_raise_corrupt_checkpoint(doc):
    with pytest.raises(CorruptCheckpointError):
        codec.decode(doc, [])


def test_deep_nesting_is_refused_not_crashing():
    doc: object = 1
    for _ in range(codec.MAX_DEPTH + 5):
        doc = [doc]
    with pytest.raises(CorruptCheckpointError):
        codec.decode(doc, [])


def nested(kind: str, levels: int) -> object:
    value: object = 1
    for _ in range(levels):
        value = {"a": value} if kind == "dict" else [value] if kind == "list" else (value,)
    return value


@pytest.mark.parametrize("kind", ["dict", "list", "tuple"])
def test_the_deepest_value_encode_accepts_decodes(kind):
    value = nested(kind, codec.MAX_ENCODE_DEPTH)
    encoded = json.loads(json.dumps(codec.encode(value, lambda t, p: 0)))
    assert codec.decode(encoded, []) == value
    with pytest.raises(UnsupportedValueError, match="nested more than"):
        codec.encode(nested(kind, codec.MAX_ENCODE_DEPTH + 1), lambda t, p: 0)


@pytest.mark.parametrize("make_cycle", [
    lambda: (d := {"x": 1}, d.__setitem__("self", d))[0],
    lambda: (lst := [1], lst.append(lst))[0],
    lambda: (lst := [1], {"outer": (lst,)}, lst.append({"back": lst}))[1],
], ids=["dict", "list", "through-a-tuple"])
def test_a_value_that_contains_itself_is_refused_with_its_path(make_cycle):
    with pytest.raises(UnsupportedValueError, match=r"cannot store the value at '(self|\[1\]|outer)"):
        codec.encode(make_cycle(), lambda t, p: 0)


@pytest.mark.parametrize("node", [
    {"$float": []}, {"$size": [2**70]}, {"$device": "cuda:99999999999999999999999"}, {"$complex": [10**400, 0]},
    {"$np": ["<i1", 10**30]}, {"$np": ["(2,3)f8,", 1]}, {"$int": "xyz"}, {"$int": 5}, {"$dict": [[[10**5000], 1]]},
], ids=lambda node: next(iter(node)))
def test_hostile_tagged_values_are_corrupt_checkpoint_errors(node):
    with pytest.raises(CorruptCheckpointError):
        codec.decode(node, ())
