"""Checkpointer save/restore in one process: exactness, snapshots, selection, errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import savegame
from savegame.errors import (
    CheckpointNotFoundError,
    ConfigurationError,
    IncompatibleStateError,
    RunLockedError,
    StorageError,
    UnsupportedValueError,
)
from savegame.storage import FaultyStorage, LocalStorage
from tests.helpers import Net, assert_same_state, make_state, train_steps


@pytest.mark.parametrize("async_save", [True, False])
def test_save_then_restore_gives_back_the_exact_state(tmp_path, async_save):
    state = make_state(0)
    train_steps(state, 3)
    with savegame.Checkpointer(tmp_path, state, async_save=async_save) as ckpt:
        path = ckpt.save(3, epoch=1, metrics={"val_loss": 0.5}, extra={"note": "any JSON", "n": [1, 2]})
    fresh = make_state(1)
    with savegame.Checkpointer(tmp_path, fresh) as ckpt:
        info = ckpt.restore()
    assert info is not None and info.step == 3 and info.epoch == 1
    assert info.metrics == {"val_loss": 0.5} and info.extra == {"note": "any JSON", "n": [1, 2]}
    assert info.path == path
    assert_same_state(state, fresh)


def test_restore_in_an_empty_run_dir_returns_none(tmp_path):
    with savegame.Checkpointer(tmp_path / "new", make_state()) as ckpt:
        assert ckpt.restore() is None
        with pytest.raises(CheckpointNotFoundError):
            ckpt.restore(5)


def test_training_continues_identically_after_restore(tmp_path):
    state = make_state(0)
    train_steps(state, 2)
    with savegame.Checkpointer(tmp_path, state) as ckpt:
        ckpt.save(2)
        ckpt.wait()
        expected = train_steps(state, 4)
    fresh = make_state(7)
    torch.manual_seed(99)
    with savegame.Checkpointer(tmp_path, fresh) as ckpt:
        ckpt.restore()
    assert train_steps(fresh, 4) == expected


def test_mutation_right_after_save_does_not_leak_into_the_checkpoint(tmp_path):
    big = torch.nn.Linear(512, 512)
    before = big.weight.detach().clone()
    with savegame.Checkpointer(tmp_path, {"model": big}, async_save=True) as ckpt:
        ckpt.save(1)
        with torch.no_grad():
            big.weight.add_(1.0)  # while the background writer may still be writing
        ckpt.wait()
    tree = savegame.load(tmp_path)
    assert torch.equal(tree["state"]["model"]["weight"], before)


def test_restore_by_step_and_by_path(tmp_path):
    model = torch.nn.Linear(2, 2)
    with savegame.Checkpointer(tmp_path, {"model": model}) as ckpt:
        paths = {}
        for step in (10, 20, 30):
            with torch.no_grad():
                model.weight.fill_(step)
            paths[step] = ckpt.save(step)
        ckpt.wait()
        assert ckpt.restore(20).step == 20
        assert model.weight[0, 0].item() == 20
        assert ckpt.restore(paths[10]).step == 10
        assert model.weight[0, 0].item() == 10
        assert ckpt.restore().step == 30
        with pytest.raises(CheckpointNotFoundError):
            ckpt.restore(25)


def test_all_rngs_continue_as_if_never_stopped(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1)
    with savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(1, 1)}) as ckpt:
        ckpt.save(0)
        ckpt.wait()
        expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), np.random.randn())
        random.seed(100), np.random.seed(100), torch.manual_seed(100)
        ckpt.restore()
        got = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), np.random.randn())
    assert got == expected


@pytest.mark.parametrize("wrap_saved,wrap_loaded", [
    ("compile", "plain"), ("plain", "compile"), ("ddp", "plain"), ("plain", "ddp"), ("compile", "ddp"),
])
def test_compiled_wrapped_and_plain_models_load_each_other(tmp_path, wrap_saved, wrap_loaded):
    def wrap(model: torch.nn.Module, how: str) -> torch.nn.Module:
        if how == "compile":
            return torch.compile(model)
        if how == "ddp":
            return torch.nn.DataParallel(model)  # adds the same `module.` prefix as DDP
        return model

    torch.manual_seed(0)
    source = Net()
    with savegame.Checkpointer(tmp_path, {"model": wrap(source, wrap_saved)}) as ckpt:
        ckpt.save(1)
    tree = savegame.load(tmp_path)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in tree["state"]["model"])
    target = Net()
    with savegame.Checkpointer(tmp_path, {"model": wrap(target, wrap_loaded)}) as ckpt:
        ckpt.restore()
    for a, b in zip(source.state_dict().values(), target.state_dict().values()):
        assert torch.equal(a, b)


def test_key_mismatch_lists_missing_unexpected_and_shape_mismatched_keys(tmp_path):
    with savegame.Checkpointer(tmp_path, {"model": torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))}) as ckpt:
        ckpt.save(1)
    other = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2), torch.nn.Linear(2, 2))
    with savegame.Checkpointer(tmp_path, {"model": other}) as ckpt:
        with pytest.raises(IncompatibleStateError) as err:
            ckpt.restore()
        message = str(err.value)
        assert "missing (4)" in message and "2.weight" in message
        assert "unexpected (2)" in message and "1.weight" in message
        assert "shape mismatch (2)" in message and "0.weight (checkpoint (3, 4), model (5, 4))" in message
        info = ckpt.restore(strict=False)
    report = info.reports["model"]
    assert report.missing == ["2.weight", "2.bias", "3.weight", "3.bias"]
    assert report.unexpected == ["1.weight", "1.bias"]


def test_missing_state_name_is_a_clear_error(tmp_path):
    with savegame.Checkpointer(tmp_path, {"model": torch.nn.Linear(1, 1)}) as ckpt:
        ckpt.save(1)
    with savegame.Checkpointer(tmp_path, {"model": torch.nn.Linear(1, 1), "ema": torch.nn.Linear(1, 1)}) as ckpt:
        with pytest.raises(IncompatibleStateError, match="ema"):
            ckpt.restore()
        assert ckpt.restore(strict=False).step == 1


def test_unsupported_values_fail_at_save_and_lose_nothing(tmp_path):
    class Weird:
        def state_dict(self):
            return {"fn": lambda: 1}

        def load_state_dict(self, s):
            pass

    model = torch.nn.Linear(1, 1)
    with savegame.Checkpointer(tmp_path, {"model": model}) as ckpt:
        ckpt.save(1)
    with savegame.Checkpointer(tmp_path, {"model": model, "weird": Weird()}) as ckpt:
        ckpt.restore(strict=False)  # continue the run (which had no 'weird' state)
        with pytest.raises(UnsupportedValueError, match="weird.fn"):
            ckpt.save(2)
    assert savegame.load(tmp_path)["step"] == 1


def test_a_cyclic_state_fails_at_save_naming_it_and_a_deep_one_round_trips(tmp_path):
    class Holder:
        def __init__(self, value):
            self.value = value

        def state_dict(self):
            return {"v": self.value}

        def load_state_dict(self, s):
            self.value = s["v"]

    deep: object = [1.5]
    for _ in range(150):
        deep = {"k": deep}
    cyclic: dict = {"x": 1}
    cyclic["self"] = cyclic
    holder = Holder(deep)
    with savegame.Checkpointer(tmp_path, {"h": holder}) as ckpt:
        ckpt.save(1)
        holder.value = cyclic
        with pytest.raises(UnsupportedValueError, match="h.v.self.self.*does a container hold itself"):
            ckpt.save(2)
        holder.value = None
        assert ckpt.restore().step == 1
    assert holder.value == deep


@pytest.mark.parametrize("kwargs,match", [
    ({"keep_last": 0}, "keep_last"), ({"keep_every": -1}, "keep_every"), ({"nan_policy": "x"}, "nan_policy"),
    ({"every_steps": 0}, "every_steps"), ({"best_k": 0}, "best_k"),
])
def test_bad_arguments_are_named(tmp_path, kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(1, 1)}, **kwargs)


def test_non_stateful_objects_are_refused_at_construction(tmp_path):
    with pytest.raises(ConfigurationError, match="state\\['thing'\\]"):
        savegame.Checkpointer(tmp_path, {"thing": object()})


def test_a_second_writer_gets_a_clear_error(tmp_path):
    with savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(1, 1)}):
        with pytest.raises(RunLockedError, match="this process already has a Checkpointer"):
            savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(1, 1)})
    savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(1, 1)}).close()  # released on close


def test_a_failed_background_save_raises_at_wait_and_training_goes_on(tmp_path):
    model = torch.nn.Linear(3, 3)
    faulty = FaultyStorage(LocalStorage(tmp_path))
    with savegame.Checkpointer(tmp_path, {"model": model}, storage=faulty) as ckpt:
        ckpt.save(1)
        ckpt.wait()
        faulty.fail_at = len(faulty.ops) + 3  # a write inside the next save
        ckpt.save(2)
        with pytest.raises(StorageError, match="I/O error"):
            ckpt.wait()
        ckpt.wait()  # the error is reported once
        ckpt.save(3)
        ckpt.wait()
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step-"))
    assert names == ["step-0000000001", "step-0000000003"]


def test_restore_maps_to_meta_model_with_assign(tmp_path):
    source = torch.nn.Linear(4, 4)
    with savegame.Checkpointer(tmp_path, {"model": source}) as ckpt:
        ckpt.save(1)
    with torch.device("meta"):
        target = torch.nn.Linear(4, 4)
    with savegame.Checkpointer(tmp_path, {"model": target}) as ckpt:
        ckpt.restore(assign=True)
    assert target.weight.device.type == "cpu" and torch.equal(target.weight, source.weight)


def test_load_returns_a_read_only_tree(tmp_path):
    with savegame.Checkpointer(tmp_path, make_state()) as ckpt:
        ckpt.save(4, epoch=0, metrics={"acc": 1.0})
    tree = savegame.load(tmp_path)
    assert tree["step"] == 4 and tree["metrics"] == {"acc": 1.0}
    assert set(tree["state"]) == {"model", "optimizer", "scheduler", "scaler"}
    assert set(tree["rng"]) == {"python", "numpy", "torch", "cuda"}
    with pytest.raises(TypeError, match="read-only"):
        tree["state"]["model"] = {}


def test_a_plain_dataloader_is_accepted_and_warns_on_restore(tmp_path, caplog):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(10.0)), batch_size=2)
    with savegame.Checkpointer(tmp_path, {"model": torch.nn.Linear(1, 1), "loader": loader}) as ckpt:
        batches = iter(loader)
        next(batches)  # mid-epoch (tests/unit/test_plain_loader.py covers the other cases)
        ckpt.save(1)
        ckpt.wait()
        ckpt.restore()
    assert "resumes at an epoch boundary" in caplog.text and "savegame.DataLoader" in caplog.text
