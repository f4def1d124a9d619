"""A model that ties two names to one tensor loads a checkpoint holding that tensor once."""

from __future__ import annotations

import pytest
import torch

import savegame
from savegame.engine.offline import write_tree
from savegame.errors import IncompatibleStateError


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied, as language models do


def test_a_tied_key_missing_from_the_checkpoint_is_restored_strictly(tmp_path):
    source = Tied()
    saved = {k: v for k, v in source.state_dict().items() if k != "head.weight"}  # as save_pretrained writes
    write_tree(tmp_path, {"state": {"model": saved}, "rng": {}, "run": {}}, step=1)
    target = Tied()
    with savegame.Checkpointer(tmp_path, {"model": target}) as ckpt:
        info = ckpt.restore()
    assert info is not None and not info.reports["model"]
    assert torch.equal(target.embed.weight, source.embed.weight)
    assert target.head.weight is target.embed.weight  # still tied


def test_an_untied_model_still_reports_the_key_missing(tmp_path):
    source = Tied()
    saved = {k: v for k, v in source.state_dict().items() if k != "head.weight"}
    write_tree(tmp_path, {"state": {"model": saved}, "rng": {}, "run": {}}, step=1)
    untied = torch.nn.ModuleDict({"embed": torch.nn.Embedding(10, 4), "head": torch.nn.Linear(4, 10, bias=False)})
    with savegame.Checkpointer(tmp_path, {"model": untied}) as ckpt, pytest.raises(IncompatibleStateError,
                                                                                      match="missing.*head.weight"):
        ckpt.restore()
