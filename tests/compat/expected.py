"""What a golden foreign checkpoint must import to, committed beside it.

The generators (make_foreign.py, make_real_tools.py) write, next to each golden
file, ``expected.json`` and ``expected.safetensors``: the states the tool saved,
taken from the live objects at save time, the RNG states, step, epoch, best
values and early stopping. test_foreign_golden.py compares the import of the
committed file against them. Nothing is re-trained when the test runs, so the
test gives the same answer on every CPU (float kernels differ between CPUs).

Encoding: tensors are stored in the safetensors file and referenced as
``{"$tensor": key}``; numpy arrays as ``{"$ndarray": dtype, "shape", "data"}``;
tuples as ``{"$tuple": [...]}``; dicts whose keys are not all strings as
``{"$dict": [[key, value], ...]}``; non-finite floats as ``{"$float": "nan"}``.
Finite floats are written by ``repr`` and read back exactly. Only torch, numpy,
safetensors and the standard library are used (the real tools' venv has no savegame).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

JSON = "expected.json"
TENSORS = "expected.safetensors"


def write_expected(directory: Path, expected: dict[str, Any]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    doc = _encode(expected, tensors)
    save_file(tensors, str(directory / TENSORS))
    (directory / JSON).write_text(_dumps(doc) + "\n")


def _dumps(doc: Any, indent: str = "") -> str:
    """JSON with one key per line, and lists of plain values (RNG states) on one line."""
    inner = indent + " "
    if isinstance(doc, dict) and doc:
        items = [f"{inner}{json.dumps(k)}: {_dumps(v, inner)}" for k, v in doc.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(doc, list) and any(isinstance(v, (dict, list)) for v in doc):
        return "[\n" + ",\n".join(inner + _dumps(v, inner) for v in doc) + "\n" + indent + "]"
    return json.dumps(doc, allow_nan=False)


def read_expected(directory: Path) -> dict[str, Any]:
    tensors = load_file(str(directory / TENSORS))
    decoded: dict[str, Any] = _decode(json.loads((directory / JSON).read_text()), tensors)
    return decoded


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().clone().contiguous()
        return {"$tensor": key}
    if isinstance(value, np.ndarray):
        return {"$ndarray": value.dtype.str, "shape": list(value.shape), "data": value.ravel().tolist()}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {"$dict": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, float) and not math.isfinite(value):
        return {"$float": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot write a {type(value).__name__} into {JSON}: {value!r:.80}")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "$tensor" in value:
        return tensors[value["$tensor"]]
    if "$ndarray" in value:
        return np.array(value["data"], dtype=np.dtype(value["$ndarray"])).reshape(value["shape"])
    if "$tuple" in value:
        return tuple(_decode(v, tensors) for v in value["$tuple"])
    if "$dict" in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["$dict"]}
    if "$float" in value:
        return float(value["$float"])
    return {k: _decode(v, tensors) for k, v in value.items()}
