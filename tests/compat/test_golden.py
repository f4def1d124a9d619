"""Every format version ever released still loads, with exactly its content."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import savegame
from tests.compat.golden import expected_state

DATA = Path(__file__).with_name("data")


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and (a == b).all()
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_v1_golden_checkpoint_loads_exactly():
    tree = savegame.load(DATA / "v1" / "step-0000000007")
    assert tree["step"] == 7 and tree["epoch"] == 1 and tree["metrics"] == {"loss": 0.25}
    assert tree["extra"] == {"golden": True}
    assert same(dict(tree["state"]), expected_state())
    model = tree["state"]["model"]
    assert model["w"].data_ptr() == model["tied"].data_ptr()  # shared storage survives
    model["w"][1, 0] = -1.0
    assert model["row"][0].item() == -1.0
