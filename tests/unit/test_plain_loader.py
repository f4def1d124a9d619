"""A plain torch DataLoader in state: resumes at epoch boundaries, and warns only when that loses data."""

from __future__ import annotations

import logging

import pytest
import torch

import savegame

WARNING = "resumes at an epoch boundary"


def make_loader(**kwargs) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(12.0)), batch_size=3, **kwargs)


def save_and_restore(tmp_path, loader, consume: int, caplog) -> str:
    with savegame.Checkpointer(tmp_path, {"loader": loader}) as ckpt:
        batches = iter(loader)
        for _ in range(consume):
            next(batches)
        ckpt.save(1)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="savegame"):
            ckpt.restore()
    return caplog.text


@pytest.mark.parametrize("consume", [1, 3])
def test_a_mid_epoch_checkpoint_warns(tmp_path, caplog, consume):
    text = save_and_restore(tmp_path, make_loader(), consume, caplog)
    assert WARNING in text and "savegame.DataLoader" in text


@pytest.mark.parametrize("consume", [0, 4])
def test_a_checkpoint_between_epochs_restores_without_a_warning(tmp_path, caplog, consume):
    text = save_and_restore(tmp_path, make_loader(), consume, caplog)
    assert WARNING not in text and "between epochs" in text


def test_persistent_workers_are_tracked_across_epochs(tmp_path, caplog):
    loader = make_loader(num_workers=1, persistent_workers=True)
    list(loader)  # a whole first epoch, then part of the second on the same (reset) iterator
    assert WARNING in save_and_restore(tmp_path, loader, 2, caplog)


def test_a_checkpoint_without_the_flag_warns(tmp_path, caplog):
    wrapper = savegame.engine.capture.PlainLoaderState(make_loader())
    with caplog.at_level(logging.WARNING, logger="savegame"):
        wrapper.load_state_dict({"kind": "torch.utils.data.DataLoader", "batch_size": 3})
    assert WARNING in caplog.text
