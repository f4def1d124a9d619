"""savegame.DataLoader resumed mid-epoch through savegame.Checkpointer (the real save and restore path).

Samplers whose state is or holds a torch.Generator state: the restored tensor
must own its storage (a generator reading a borrowed buffer crashed the process),
and the resumed batches must be bit-identical to an uninterrupted run's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame
from savegame.data import DataLoader
from tests.unit.test_data_support import Augmented, flatten_epochs, same_all, take

N, BATCH, EPOCHS = 22, 4, 3


class GeneratorSampler(torch.utils.data.Sampler[int]):
    """A stateful sampler that shuffles each pass with its own torch.Generator.

    Its state holds the generator's state at the start of the current pass (a
    uint8 tensor) and the position in the pass; after ``load_state_dict`` the
    next ``iter()`` continues the pass.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.generator = n, torch.Generator().manual_seed(seed)
        self.pass_start: torch.Tensor | None = None
        self.order: list[int] = []
        self.position, self.resume = 0, False

    def __len__(self) -> int:
        return self.n

    def __iter__(self):  # type: ignore[no-untyped-def]
        if not self.resume:
            self._new_pass()
        self.resume = False
        while self.position < self.n:
            self.position += 1
            yield self.order[self.position - 1]

    def _new_pass(self) -> None:
        self.pass_start = self.generator.get_state()
        self.order = torch.randperm(self.n, generator=self.generator).tolist()
        self.position = 0

    def state_dict(self) -> dict:
        started = self.pass_start is not None
        return {"generator": self.pass_start if started else self.generator.get_state(),
                "position": self.position, "started": started}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        if state["started"]:
            self._new_pass()
            self.position, self.resume = state["position"], True


def random_sampler(dataset: Any) -> dict[str, Any]:
    return {"sampler": torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(5))}


def generator_sampler(dataset: Any) -> dict[str, Any]:
    return {"sampler": GeneratorSampler(len(dataset), seed=5)}


SAMPLERS = {"RandomSampler-own-generator": random_sampler, "stateful-sampler-with-generator": generator_sampler}


def build(kind: Callable[[Any], dict[str, Any]], **kwargs: Any) -> DataLoader:
    dataset = Augmented(N)
    return DataLoader(dataset, batch_size=BATCH, seed=kwargs.pop("seed", 11), **kind(dataset), **kwargs)


def save_after(loader: DataLoader, stop: int, run_dir: Path) -> list[Any]:
    """Consume ``stop`` batches (across epochs), save the loader through a Checkpointer; the batches seen."""
    head = take(loader, stop)
    with savegame.Checkpointer(run_dir, state={"loader": loader}) as ckpt:
        ckpt.save(stop)
    return head


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop", [2, 6, 9])
def test_a_sampler_with_a_generator_resumes_bit_exact_through_the_checkpointer(
        tmp_path: Path, name: str, workers: int, stop: int) -> None:
    kind = SAMPLERS[name]
    reference = flatten_epochs(build(kind), EPOCHS)
    head = save_after(build(kind, num_workers=workers), stop, tmp_path / "run")
    resumed = build(kind, num_workers=workers, seed=99)
    if name == "stateful-sampler-with-generator":
        resumed.sampler.generator.manual_seed(1234)             # the restore must bring the saved state back
    with savegame.Checkpointer(tmp_path / "run", state={"loader": resumed}) as ckpt:
        info = ckpt.restore()
    assert info is not None and info.step == stop
    assert same_all(head + flatten_epochs(resumed, EPOCHS), reference)
    assert not same_all(reference[:2], reference[6:8]), "the epochs are shuffled differently"
