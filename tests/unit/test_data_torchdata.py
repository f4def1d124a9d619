"""A torchdata StatefulDataLoader in the Checkpointer's state resumes mid-epoch through its own state.

torchdata restores its position and shuffle order; it does not reproduce random
augmentation (its worker generators restart, and starting an iterator draws from
the global torch generator), so the dataset here is deterministic: see docs/data.md.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import savegame
from tests.unit.test_data_support import same_all

stateful_dataloader = pytest.importorskip(
    "torchdata.stateful_dataloader",
    reason="torchdata is not installed (pip install torchdata==0.11.0 --no-deps, plus requests and urllib3)")
StatefulDataLoader = stateful_dataloader.StatefulDataLoader

N, BATCH = 30, 4                       # 8 batches, the last one short


class Features(torch.utils.data.Dataset):
    """Sample i is (i, a fixed feature vector of i)."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(index)
        return torch.tensor(index), torch.randn(3, generator=gen, dtype=torch.float64)


def build(shuffle: bool, workers: int, seed: int) -> Any:
    """torchdata draws its shuffle seed from the global generators: other seeds for the resumed loader."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return StatefulDataLoader(Features(), batch_size=BATCH, shuffle=shuffle, num_workers=workers)


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop", [1, 5])
def test_a_stateful_dataloader_resumes_bit_exact_through_the_checkpointer(
        tmp_path: Path, shuffle: bool, workers: int, stop: int) -> None:
    reference = list(build(shuffle, workers, seed=0))
    assert len(reference) == 8
    loader = build(shuffle, workers, seed=0)
    iterator = iter(loader)
    head = [next(iterator) for _ in range(stop)]
    with savegame.Checkpointer(tmp_path / "run", state={"loader": loader}) as ckpt:
        ckpt.save(stop)
    del iterator
    resumed = build(shuffle, workers, seed=123)     # other seeds: the restore must bring the saved ones back
    with savegame.Checkpointer(tmp_path / "run", state={"loader": resumed}) as ckpt:
        assert ckpt.restore() is not None
    rest = list(resumed)
    assert len(rest) == 8 - stop
    assert same_all(head + rest, reference)
    if shuffle:
        assert not torch.equal(reference[0][0], torch.arange(BATCH)), "the reference is shuffled"
