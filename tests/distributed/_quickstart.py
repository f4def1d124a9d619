"""A rank running docs/distributed.md's quick start as written: ``python _quickstart.py <run_dir>``."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[2] / "docs" / "distributed.md"


def quick_start() -> str:
    block = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)[0]
    assert '"/shared/runs/exp1"' in block
    return block.replace('"/shared/runs/exp1"', repr(sys.argv[1]))


def scope() -> dict:
    """The names the quick start leaves to the reader: a model, a dataset, a training step, 2 epochs."""
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(512, 10), torch.randint(0, 2, (512,)))
    out: dict = {"build_model": lambda: torch.nn.Linear(10, 2), "dataset": data, "epochs": 2,
                 "evaluate": lambda m: float(m.module.weight.detach().abs().sum())}

    def train_step(batch):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(out["model"](x), y)
        out["opt"].zero_grad()
        loss.backward()
        out["opt"].step()

    out["train_step"] = train_step
    return out


if __name__ == "__main__":
    names = scope()
    exec(compile(quick_start(), str(DOC), "exec"), names)  # noqa: S102 (our own documentation)
    print(json.dumps({"rank": names["rank"], "step": names["step"], "resumed": names["info"] is not None,
                      "weight": names["model"].module.weight.detach().double().sum().item()}), flush=True)
