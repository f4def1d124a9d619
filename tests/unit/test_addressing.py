"""Addressing a run's checkpoints: list_checkpoints, path_of, load(which=), restore("RUN@which", only=), RUN@ in the CLI."""

from __future__ import annotations

import logging

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import savegame
from savegame.cli import main
from savegame.errors import CheckpointNotFoundError, ConfigurationError, IncompatibleStateError

# step: (val_loss, acc). Best val_loss at step 20, best acc at step 30, latest 40.
METRICS = {10: (0.5, 0.60), 20: (0.2, 0.70), 30: (0.4, 0.90), 40: (0.3, 0.80)}


def net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run with two tracked metrics; the first weight of the model holds the step of each checkpoint."""
    path = tmp_path_factory.mktemp("addr") / "pretrain"
    model = net()
    opt = torch.optim.Adam(model.parameters())
    with savegame.Checkpointer(path, {"model": model, "optimizer": opt}, async_save=False,
                               best={"val_loss": "min", "acc": "max"}) as ckpt:
        for epoch, (step, (loss, acc)) in enumerate(METRICS.items()):
            with torch.no_grad():
                model[0].weight.fill_(step)
            ckpt.save(step, epoch=epoch, metrics={"val_loss": loss, "acc": acc})
    return path


def ck(run, step: int) -> str:
    return str(run / f"step-{step:010d}")


def test_list_checkpoints_returns_typed_records_oldest_first(run):
    entries = savegame.list_checkpoints(run)
    assert [e.step for e in entries] == [10, 20, 30, 40]
    assert [e.epoch for e in entries] == [0, 1, 2, 3]
    assert entries[1].metrics == {"val_loss": 0.2, "acc": 0.7}
    assert [e.path for e in entries] == [ck(run, s) for s in (10, 20, 30, 40)]
    assert [e.aliases for e in entries] == [(), ("best", "best:val_loss"), ("best:acc",), ("latest",)]
    assert all(e.bytes > 0 and e.time > 0 and not e.pinned for e in entries)
    assert isinstance(entries[0], savegame.CheckpointEntry)


def test_list_checkpoints_leaves_a_damaged_one_out_with_a_warning(run, tmp_path, caplog):
    import shutil
    copy = shutil.copytree(run, tmp_path / "copy")
    (copy / "step-0000000030" / "tensors-00000.safetensors").write_bytes(b"short")
    with caplog.at_level(logging.WARNING, logger="savegame"):
        entries = savegame.list_checkpoints(copy)
    assert [e.step for e in entries] == [10, 20, 40] and "step-0000000030" in caplog.text


def test_list_checkpoints_of_a_missing_directory_is_not_an_empty_run(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no run directory"):
        savegame.list_checkpoints(tmp_path / "typo")


def test_path_of_names_latest_best_a_metric_and_a_step(run, tmp_path):
    with savegame.Checkpointer(tmp_path / "other", {"model": net()}) as ckpt:
        assert ckpt.path_of() is None and ckpt.path_of(3) is None
        assert ckpt.path_of(f"{run}@best:acc") == ck(run, 30)
    with savegame.Checkpointer(run, {"model": net()}) as ckpt:
        assert ckpt.path_of("latest") == ck(run, 40)
        assert ckpt.path_of("best") == ck(run, 20)
        assert ckpt.path_of("best:val_loss") == ck(run, 20)
        assert ckpt.path_of("best:acc") == ck(run, 30)
        assert ckpt.path_of(10) == ck(run, 10)
        assert ckpt.path_of(11) is None


def test_load_with_which_or_an_address(run):
    assert savegame.load(run)["step"] == 40
    assert savegame.load(run, which="best")["step"] == 20
    assert savegame.load(run, which="best:acc")["step"] == 30
    assert savegame.load(run, which=10)["step"] == 10
    assert savegame.load(f"{run}@best:acc")["step"] == 30
    assert savegame.load(f"{run}@20")["state"]["model"]["0.weight"][0, 0].item() == 20
    with pytest.raises(CheckpointNotFoundError):
        savegame.load(run, which=15)
    with pytest.raises(ConfigurationError, match="checkpoint directory"):
        savegame.load(ck(run, 10), which="best")
    with pytest.raises(ConfigurationError, match="after '@'"):
        savegame.load(f"{run}@bset")
    with pytest.raises(CheckpointNotFoundError):  # a missing path that happens to hold an '@'
        savegame.load(run.parent / "user@host")


def test_restore_another_runs_best_weights_only(run, tmp_path):
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_before = opt.state_dict()
    with savegame.Checkpointer(tmp_path / "finetune", {"model": model, "optimizer": opt},
                               async_save=False) as ckpt:
        assert ckpt.restore() is None
        info = ckpt.restore(f"{run}@best:val_loss", only=["model"])
        assert info.step == 20 and info.path == ck(run, 20)
        assert model[0].weight[0, 0].item() == 20.0
        assert opt.state_dict() == opt_before  # the SGD state was left alone (the run saved Adam)
        ckpt.save(1)  # a fine-tuning run counts from 1: not a step backwards
    assert [e.step for e in savegame.list_checkpoints(tmp_path / "finetune")] == [1]


def test_restore_only_leaves_the_rngs_alone(run, tmp_path):
    with savegame.Checkpointer(tmp_path / "ft", {"model": net()}) as ckpt:
        torch.manual_seed(5)
        expected = torch.rand(3)
        torch.manual_seed(5)
        ckpt.restore(f"{run}@latest", only=["model"])
        assert torch.equal(torch.rand(3), expected)


def test_restore_only_is_checked_before_anything_is_read(run, tmp_path):
    model = net()
    before = model[0].weight.detach().clone()
    with savegame.Checkpointer(tmp_path / "ft", {"model": model}) as ckpt:
        with pytest.raises(ConfigurationError, match="'modle'.*'model'"):
            ckpt.restore(f"{run}@best", only=["modle"])
        with pytest.raises(ConfigurationError, match="list of state names"):
            ckpt.restore(f"{run}@best", only="model")
        with pytest.raises(CheckpointNotFoundError, match="no run directory"):
            ckpt.restore(f"{tmp_path / 'typo'}@best", only=["model"])
        with pytest.raises(CheckpointNotFoundError, match=f"no checkpoint 15 in {run}$"):
            ckpt.restore(f"{run}@15", only=["model"])
    assert torch.equal(model[0].weight, before)
    wide = torch.nn.Sequential(torch.nn.Linear(4, 9), torch.nn.Linear(9, 2))
    with savegame.Checkpointer(tmp_path / "wide", {"model": wide}) as ckpt, \
            pytest.raises(IncompatibleStateError, match="state 'model' does not match.*0.weight"):
        ckpt.restore(f"{run}@best", only=["model"])  # strict for the chosen states


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_the_cli_takes_run_addresses_wherever_it_takes_a_checkpoint(run, tmp_path):
    out = cli("inspect", f"{run}@best:acc", "--json")
    assert out.exit_code == 0, out.output
    assert '"step": 30' in out.output
    out = cli("verify", f"{run}@best")
    assert out.exit_code == 0 and "step-0000000020" in out.output and "step-0000000040" not in out.output
    out = cli("diff", f"{run}@10", f"{run}@latest")
    assert out.exit_code == 0 and "0.weight" in out.output, out.output
    target = tmp_path / "model.safetensors"
    out = cli("export", f"{run}@best:val_loss", "--to", target)
    assert out.exit_code == 0, out.output
    assert load_file(str(target))["0.weight"][0, 0].item() == 20.0
    out = cli("inspect", f"{run}@best:nope")
    assert out.exit_code == 2 and "nope" in out.output
    out = cli("inspect", f"{run}@bset")
    assert out.exit_code == 2 and "after '@'" in out.output
