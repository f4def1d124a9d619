"""A small run with one of everything a manifest describes, and the readers to try on it.

Used by the hostile-manifest regression tests and the structure-aware fuzzer: every public
reader and every CLI command either succeeds or raises one savegame error.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from click.testing import CliRunner

import savegame
from savegame.cli import main
from savegame.errors import SavegameError

OLD, NEW = "step-0000000001", "step-0000000002"


class Arrays:
    """NumPy arrays, an empty tensor and a uint8 tensor: entries whose dtype and shape can be rewritten."""

    def __init__(self) -> None:
        self.value: dict[str, Any] = {"a": np.arange(6, dtype=np.int16), "b": np.arange(4, dtype=np.int8),
                                      "e": torch.empty(0, 3), "u": torch.arange(4, dtype=torch.uint8)}

    def state_dict(self) -> dict[str, Any]:
        return self.value

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = dict(state)


class Views:
    """Two views of one storage: saved as a uint8 span and view records."""

    def __init__(self) -> None:
        self.w = torch.randn(4, 3)

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.w, "col": self.w[:, 1]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.w = state["w"]


def objects() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt, "arrays": Arrays(), "views": Views()}


def make_run(path: Path) -> dict[str, torch.Tensor]:
    """Two checkpoints (steps 1 and 2) with different model weights; returns the weights of step 1."""
    objs = objects()
    with savegame.Checkpointer(path, objs, async_save=False) as ckpt:
        ckpt.save(1, metrics={"loss": 1.0}, extra={"note": "old"})
        old = {k: v.clone() for k, v in objs["model"].state_dict().items()}
        with torch.no_grad():
            objs["model"].weight.add_(1.0)
        ckpt.save(2, metrics={"loss": 0.5}, extra={"note": "new"})
    return old


def attempt(fn: Callable[[], Any]) -> Any:
    """``fn()``, or the SavegameError it raised (anything else propagates: a bug)."""
    try:
        return fn()
    except SavegameError as exc:
        return exc


def restore(run: Path, objs: dict[str, Any], **kwargs: Any) -> Any:
    with savegame.Checkpointer(run, objs) as ckpt:
        return ckpt.restore(**kwargs)


def cli_commands(run: Path, out: Path) -> list[list[str]]:
    new, old = str(run / NEW), str(run / OLD)
    return [["verify", str(run)], ["verify", new], ["inspect", new], ["inspect", "--json", "--tree", new],
            ["ls", str(run)], ["ls", "--verify", "--json", str(run)], ["diff", old, new],
            ["export", new, "--to", str(out / "w.safetensors")], ["export", new, "--to", str(out / "w.npz")]]


def run_cli(args: list[str]) -> Any:
    """One command in-process; asserts it ended as the CLI promises: exit 0, 1 (a finding) or 2 with
    a one-line ``savegame: error:`` message, never an unexpected exception."""
    result = CliRunner().invoke(main, args)
    text = result.output or ""
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exception)
    assert result.exit_code in (0, 1, 2), (args, result.exit_code, text)
    assert "a bug in savegame" not in text, (args, text)
    if result.exit_code == 2:
        errors = [line for line in text.splitlines() if line.startswith("savegame: error:")]
        assert len(errors) == 1, (args, text)
    return result


def all_readers(run: Path, out: Path) -> dict[str, Any]:
    """Every public reader on the run whose newest checkpoint is hostile; each result or SavegameError."""
    os.makedirs(out, exist_ok=True)
    results = {"load": attempt(lambda: savegame.load(run / NEW)),
               "load_mmap": attempt(lambda: savegame.load(run / NEW, mmap=True)),
               "restore": attempt(lambda: restore(run, objects())),
               "restore_loose": attempt(lambda: restore(run, objects(), strict=False))}
    for args in cli_commands(run, out):
        results[" ".join(args[:2])] = run_cli(args)
    return results
