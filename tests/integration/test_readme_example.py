"""The README's example runs as written (with 3 epochs instead of 300), and resumes."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import savegame

README = Path(__file__).resolve().parents[2] / "README.md"


def example_code() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "the README has no python example"
    return blocks[0].replace("300", "3")


def run_example(workdir: Path) -> dict:
    dataset = torch.utils.data.TensorDataset(torch.randn(96, 10), torch.randint(0, 2, (96,)))
    scope = {"dataset": dataset, "evaluate": lambda model: model.weight.detach().abs().sum().item()}
    exec(compile(example_code(), str(README), "exec"), scope)  # noqa: S102 (our own README)
    return scope


def test_the_readme_example_runs_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    first = run_example(tmp_path)
    assert first["tree"]["step"] == 2 and first["info"] is None
    assert max(p.name for p in (tmp_path / "runs" / "exp1").glob("step-*")) == "step-0000000002"
    second = run_example(tmp_path)  # a new process would do the same: resume, find nothing left to train
    assert second["info"] is not None and second["info"].epoch == 2
    best = savegame.load("runs/exp1")["run"]["best"]["val_loss"]["entries"]
    assert len(best) == 1 and best[0][1] in (0, 1, 2)  # best tracking ran on the README's metric
