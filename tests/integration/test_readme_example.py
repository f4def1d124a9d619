"""The README's example runs as written (with 3 epochs instead of 300), and resumes."""

from __future__ import annotations

import json
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
    assert first["info"] is None and first["loader"].epoch == 3
    assert max(p.name for p in (tmp_path / "runs" / "exp1").glob("step-*")) == "step-0000000002"
    losses = [json.loads(line)["metrics"]["val_loss"] for line in (tmp_path / "runs/exp1/metrics.jsonl").open()]
    assert len(losses) == 3 and first["tree"]["metrics"]["val_loss"] == min(losses)  # load(which="best")
    second = run_example(tmp_path)  # a new process would do the same: resume, find nothing left to train
    assert second["info"] is not None and second["info"].epoch == 2
    best = savegame.load("runs/exp1")["run"]["best"]["val_loss"]["entries"]
    assert len(best) == 1 and best[0][1] in (0, 1, 2)  # best tracking ran on the README's metric


GUIDE = README.parent / "docs" / "guide.md"


def guide_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL)


def training_scope() -> dict:
    """The names the guide's examples use: a small model, its optimizers, a resumable loader, 2 epochs."""
    model, disc = torch.nn.Linear(10, 2), torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, 10)
    data = torch.utils.data.TensorDataset(torch.randn(64, 10), torch.randint(0, 2, (64,)))
    loader = savegame.DataLoader(data, batch_size=16, shuffle=True)

    def train_step(batch):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()

    return {"model": model, "opt": opt, "sched": sched, "scaler": torch.amp.GradScaler("cpu"),
            "loader": loader, "ema_model": torch.optim.swa_utils.AveragedModel(model),
            "opt_d": torch.optim.SGD(disc.parameters(), lr=0.1), "epochs": 2, "train_step": train_step,
            "evaluate": lambda m: m.weight.detach().abs().sum().item(),
            "accuracy": lambda m: m.bias.detach().abs().sum().item()}


def test_the_guides_examples_run_as_written_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    blocks = guide_blocks()
    assert len(blocks) == 7, "the guide's examples changed: run the new ones here too"
    scopes = []
    for i, block in enumerate(blocks):
        scope = training_scope()
        try:
            exec(compile(block, f"{GUIDE}, example {i + 1}", "exec"), scope)  # noqa: S102 (our own guide)
        except SystemExit as stop:  # the preemption example ends with sys.exit(3 if stopped by a signal else 0)
            assert stop.code == 0, i
        scopes.append(scope)
    assert scopes[0]["step"] == 8 and scopes[0]["loader"].epoch == 2  # 2 epochs of 4 batches
    again = training_scope()
    exec(compile(blocks[0], str(GUIDE), "exec"), again)  # noqa: S102 (run again: resumes, nothing left to train)
    assert again["info"].step == 8 and again["step"] == 8
    best = savegame.load("runs/exp1", which="best:val_loss")
    assert scopes[2]["weights"]["weight"].equal(best["state"]["model"]["weight"])
    assert scopes[2]["model"].weight.equal(best["state"]["model"]["weight"])  # the fine-tuning example's only=
    assert [c.step for c in savegame.list_checkpoints("runs/exp2")] == [4, 8]
    incremental = scopes[4]["ckpt"]  # the incremental example opens a Checkpointer; it saves like any other
    incremental.save(1)
    incremental.save(2)
    incremental.close()
    assert [c.step for c in savegame.list_checkpoints("runs/ft")] == [1, 2]
    assert len(list((tmp_path / "runs/ft/data").iterdir())) >= 1  # its tensor data lives in the run's packs
    assert [c.step for c in savegame.list_checkpoints("runs/exp3")] == [4, 8]
    compressed = scopes[5]["ckpt"]  # the compression example opens a Checkpointer too
    compressed.save(1)
    compressed.close()
    assert savegame.load("runs/small")["state"]["model"]["weight"].equal(scopes[5]["model"].weight)
