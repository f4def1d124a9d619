"""Restore and addressing edges.

Fine-tuning with ``only=`` is not refused for the other run's bookkeeping; a torch RNG
state torch rejects never leaves the model half restored; addresses and run-directory
arguments fail with savegame errors; a run directory read without ``which`` means its
latest readable checkpoint.
"""

from __future__ import annotations

import json

import pytest
import torch

import savegame
from savegame.errors import CheckpointNotFoundError, ConfigurationError, CorruptCheckpointError
from savegame.format import names as n
from savegame.run.directory import parse_step
from tests.damage import data_byte, entry_at


def _filled(value: float) -> torch.nn.Linear:
    model = torch.nn.Linear(3, 3)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(value)
    return model


def test_only_model_from_a_run_with_other_early_stopping_is_not_refused(tmp_path):
    pre = tmp_path / "pretrain"
    with savegame.Checkpointer(pre, {"model": _filled(7.0)}, async_save=False, best="val_loss",
                               early_stopping=savegame.EarlyStopping("val_loss", patience=3)) as ckpt:
        ckpt.save(1, metrics={"val_loss": 0.5})
    model = _filled(0.0)
    with savegame.Checkpointer(tmp_path / "ft", {"model": model}, async_save=False, best={"pck": "max"},
                               early_stopping=savegame.EarlyStopping("pck", mode="max", patience=2)) as ckpt:
        info = ckpt.restore(f"{pre}@best:val_loss", only=["model"])
        assert info is not None and info.step == 1
        assert model.weight.eq(7.0).all()
        ckpt.save(1, metrics={"pck": 0.1})  # the fine-tuning run's own bookkeeping is untouched


def test_a_torch_rng_state_torch_rejects_leaves_the_model_untouched(tmp_path):
    with savegame.Checkpointer(tmp_path, {"model": _filled(1.0)}, async_save=False) as ckpt:
        ckpt.save(1)
    folder = tmp_path / "step-0000000001"
    doc = json.loads((folder / n.MANIFEST).read_bytes())
    e = entry_at(doc, n.TREE_RNG, "torch")
    size = doc[n.M_ENTRIES][n.E_END][e] - doc[n.M_ENTRIES][n.E_START][e] if isinstance(
        doc[n.M_ENTRIES][n.E_END], list) else None
    assert size, "the torch RNG state is a data entry of its own"
    path, offset = data_byte(folder, e)
    with open(path, "r+b") as f:  # bytes torch's generator refuses; checksums not checked (verify=False)
        f.seek(offset)
        f.write(b"\xff" * size)
    model = _filled(2.0)
    with savegame.Checkpointer(tmp_path, {"model": model}, async_save=False) as ckpt, \
            pytest.raises(CorruptCheckpointError):
        ckpt.restore(verify=False)
    assert model.weight.eq(2.0).all() and model.bias.eq(2.0).all(), "restore changed the model, then failed"


@pytest.mark.parametrize("which", ["\u00b2", "\u0661", "9" * 5000])
def test_an_address_whose_step_is_not_ascii_digits_is_a_savegame_error(tmp_path, which):
    with savegame.Checkpointer(tmp_path / "run", {"model": _filled(1.0)}, async_save=False) as ckpt:
        ckpt.save(1)
    with pytest.raises((ConfigurationError, CheckpointNotFoundError)):
        savegame.load(f"{tmp_path / 'run'}@{which}")


@pytest.mark.parametrize("bad", [123, b"runs/x", "runs\0x"])
def test_list_checkpoints_refuses_what_is_not_a_path(bad):
    with pytest.raises(ConfigurationError):
        savegame.list_checkpoints(bad)


def test_a_nul_in_an_address_is_a_configuration_error(tmp_path):
    with savegame.Checkpointer(tmp_path, {"model": _filled(1.0)}, async_save=False) as ckpt, \
            pytest.raises(ConfigurationError, match="NUL"):
        ckpt.restore("x\0y@latest")


def test_load_of_a_run_directory_is_its_latest_intact_checkpoint(tmp_path):
    model = _filled(1.0)
    with savegame.Checkpointer(tmp_path, {"model": model}, async_save=False) as ckpt:
        ckpt.save(1)
        with torch.no_grad():
            model.weight.fill_(2.0)
        ckpt.save(2)
    (tmp_path / "step-0000000002" / n.MANIFEST).write_bytes(b"{")  # the newest cannot be read
    tree = savegame.load(tmp_path)
    assert tree["step"] == 1 == savegame.load(tmp_path, which="latest")["step"]


def test_step_names_are_ascii_digits_only():
    assert parse_step("step-0000000012") == 12
    assert parse_step("step-" + "\u0661" * 10) is None
