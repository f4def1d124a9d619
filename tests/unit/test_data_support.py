"""Shared helpers of the savegame.data tests (datasets that count reads, state checks); no tests here."""

from __future__ import annotations

import json
import multiprocessing
import random
from typing import Any

import numpy as np
import torch

from savegame.format import codec

PLAIN = (type(None), bool, int, float, str)


def assert_plain(value: Any, path: str = "state") -> None:
    """Fail unless ``value`` holds only None/bool/int/float/str/tuple/list/dict/tensor/ndarray."""
    if isinstance(value, (PLAIN, torch.Tensor, np.ndarray)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            assert_plain(item, f"{path}[{i}]")
        return
    assert isinstance(value, dict), f"{path} is a {type(value).__name__}"
    for key, item in value.items():
        assert isinstance(key, PLAIN), f"{path} has key {key!r}"
        assert_plain(item, f"{path}[{key!r}]")


def roundtrip(state: Any) -> Any:
    """``state`` after the checkpoint codec's strict-JSON + tensor encoding, as a restore would see it."""
    assert_plain(state)
    tensors: list[torch.Tensor] = []

    def sink(tensor: torch.Tensor, path: str) -> int:
        tensors.append(tensor.clone())
        return len(tensors) - 1

    text = json.dumps(codec.encode(state, sink), allow_nan=False)
    return codec.decode(json.loads(text), tensors)


def same(a: Any, b: Any) -> bool:
    """Exact equality of nested batches (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def same_all(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


def global_rng() -> tuple[Any, ...]:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def assert_rng_unchanged(before: tuple[Any, ...]) -> None:
    after = global_rng()
    assert torch.equal(before[0], after[0]), "the global torch generator changed"
    assert before[1] == after[1], "the global Python generator changed"
    assert before[2][0] == after[2][0] and np.array_equal(before[2][1], after[2][1]) \
        and before[2][2:] == after[2][2:], "the global NumPy generator changed"


class Augmented(torch.utils.data.Dataset):
    """Sample i is (i, noise) with noise from torch, NumPy and Python globals: augmentation in a worker.

    ``reads`` counts every ``__getitem__`` per index in shared memory, so reads in
    worker processes (fork) are counted too.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.reads = multiprocessing.get_context("fork").Array("i", n, lock=True)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        with self.reads.get_lock():
            self.reads[index] += 1
        noise = torch.rand(1).item() + float(np.random.rand()) + random.random()
        return torch.tensor(index), torch.tensor([noise], dtype=torch.float64)

    def read_counts(self) -> list[int]:
        return list(self.reads)


def flatten_epochs(loader: Any, epochs: int) -> list[Any]:
    """Every batch of ``loader`` until it reaches epoch ``epochs`` (a resumed loader continues its epoch)."""
    out: list[Any] = []
    while loader.epoch < epochs:
        out.extend(loader)
    return out


def take(loader: Any, count: int) -> list[Any]:
    """The next ``count`` batches of ``loader``, across epochs; the last iterator is left unfinished."""
    head: list[Any] = []
    while len(head) < count:
        for batch in loader:
            head.append(batch)
            if len(head) == count:
                break
    return head
