"""The mistakes a training script makes every week are refused, each by one ConfigurationError, before any write."""

from __future__ import annotations

import logging
import os
import re

import pytest
import torch

import savegame
from savegame.errors import ConfigurationError, IncompatibleStateError


def snapshot(run) -> dict[str, tuple[int, int]]:
    """Every file under ``run`` (except the lock) with its size and mtime: 'nothing was written' is this unchanged."""
    out = {}
    for root, _, files in os.walk(run):
        for f in files:
            if f != ".savegame.lock":
                st = os.stat(os.path.join(root, f))
                out[os.path.relpath(os.path.join(root, f), run)] = (st.st_size, st.st_mtime_ns)
    return out


def steps(run) -> list[int]:
    return sorted(int(p.name[5:15]) for p in run.iterdir() if p.name.startswith("step-"))


def make(run, model=None, **kwargs):
    model = model if model is not None else torch.nn.Linear(2, 2)
    return model, savegame.Checkpointer(run, {"model": model}, async_save=False, **kwargs)


# --- 1: a monitored metric that is never given --------------------------------------------------

@pytest.mark.parametrize("watch", [{"best": {"val_los": "min"}},
                                   {"early_stopping": savegame.EarlyStopping("val_los", mode="min", patience=2)}])
def test_a_misspelt_monitored_metric_is_refused_at_the_first_save_with_metrics(tmp_path, watch):
    _, ckpt = make(tmp_path, **watch)
    ckpt.save(1)  # a mid-epoch save without metrics is fine
    before = snapshot(tmp_path)
    with pytest.raises(ConfigurationError, match=r"lacks 'val_los' \(did you mean 'val_loss'\?\).*'acc', 'val_loss'"):
        ckpt.save(2, metrics={"val_loss": 0.5, "acc": 0.9})
    assert snapshot(tmp_path) == before and steps(tmp_path) == [1]
    ckpt.save(2, metrics={"val_los": 0.5})  # the watched name given: accepted
    ckpt.close()
    assert steps(tmp_path) == [1, 2]


def test_the_missing_metric_is_refused_before_anything_is_written_in_a_new_run(tmp_path):
    _, ckpt = make(tmp_path / "run", best={"val_loss": "min"})
    with pytest.raises(ConfigurationError, match="val_loss"):
        ckpt.save(1, metrics={"loss": 0.3})
    ckpt.close()
    assert snapshot(tmp_path / "run") == {}


# --- 2: a new run in a used run directory -------------------------------------------------------

def old_run(run, n=3):
    model, ckpt = make(run, keep_last=2, best={"loss": "min"})
    for step in range(10, 10 * n + 1, 10):
        ckpt.save(step, metrics={"loss": 0.01 * step})
    ckpt.close()
    return model


def test_a_new_run_in_a_used_run_directory_is_refused_until_it_restores(tmp_path):
    old_run(tmp_path)
    before = snapshot(tmp_path)
    _, ckpt = make(tmp_path, keep_last=2, best={"loss": "min"})
    with pytest.raises(ConfigurationError, match="restore\\(\\).*another run directory.*fresh=True"):
        ckpt.save(1, metrics={"loss": 0.5})
    assert snapshot(tmp_path) == before
    assert ckpt.restore().step == 30  # continuing that run: accepted
    ckpt.save(40, metrics={"loss": 0.5})
    ckpt.close()
    assert steps(tmp_path) == [10, 30, 40]  # keep_last=2 plus the best (step 10), one run


def test_a_restore_that_found_nothing_counts_as_having_restored(tmp_path):
    _, ckpt = make(tmp_path)
    assert ckpt.restore() is None
    ckpt.save(1)
    ckpt.save(2)  # its own checkpoints never trip the guard
    ckpt.close()
    assert steps(tmp_path) == [1, 2]


def test_fresh_moves_the_old_run_aside_and_starts_a_new_one(tmp_path):
    old_run(tmp_path)  # steps 10 (best, loss 0.1), 20, 30 on disk; keep_last=2 kept 20, 30
    moved = snapshot(tmp_path)
    _, ckpt = make(tmp_path, keep_last=1, best={"loss": "min"}, fresh=True)
    assert steps(tmp_path) == [] and not (tmp_path / "metrics.jsonl").exists()
    (folder,) = (tmp_path / "abandoned").iterdir()
    assert snapshot(folder) == {k: v for k, v in moved.items()}  # nothing deleted, nothing changed
    for step, loss in ((1, 0.9), (2, 0.8), (3, 0.95)):  # every loss worse than the old run's best
        ckpt.save(step, metrics={"loss": loss})
    assert ckpt.path_of("best") == str(tmp_path / "step-0000000002")
    assert ckpt.path_of("latest") == str(tmp_path / "step-0000000003")
    ckpt.close()
    assert steps(tmp_path) == [2, 3]  # retention saw only the new run
    assert [e.step for e in savegame.list_checkpoints(tmp_path)] == [2, 3]
    assert savegame.load(tmp_path, which="best")["step"] == 2
    assert sorted(p.name[:15] for p in folder.glob("step-*")) == ["step-0000000010", "step-0000000020",
                                                                    "step-0000000030"]


def test_fresh_must_be_a_bool(tmp_path):
    with pytest.raises(ConfigurationError, match="fresh"):
        make(tmp_path / "run", fresh="yes")
    assert not (tmp_path / "run").exists()


# --- 3: a step counter that goes backwards ------------------------------------------------------

def test_a_step_below_the_restored_one_is_refused(tmp_path):
    old_run(tmp_path, n=17)
    _, ckpt = make(tmp_path, keep_last=2, best={"loss": "min"})
    assert ckpt.restore().step == 170
    before = snapshot(tmp_path)
    with pytest.raises(ConfigurationError, match=r"save\(10\).*restored from step 170.*step = info.step"):
        ckpt.save(10, metrics={"loss": 0.0})
    assert snapshot(tmp_path) == before
    ckpt.save(180, metrics={"loss": 2.0})
    ckpt.close()
    assert steps(tmp_path) == [10, 170, 180]


def test_restoring_an_older_step_allows_saving_from_there(tmp_path):
    old_run(tmp_path, n=3)
    _, ckpt = make(tmp_path, keep_last=5)
    assert ckpt.restore(20).step == 20
    ckpt.save(20)  # saving the restored step again is no step backwards
    ckpt.close()


# --- 4: a mistyped run directory ---------------------------------------------------------------

def test_restore_in_an_empty_run_directory_says_so_at_info(tmp_path, caplog):
    _, ckpt = make(tmp_path / "typo")
    with caplog.at_level(logging.INFO, logger="savegame"):
        assert ckpt.restore() is None
    ckpt.close()
    assert f"no checkpoint in {tmp_path / 'typo'}: starting from scratch" in caplog.text


# --- 5: a changed architecture -----------------------------------------------------------------

def test_a_changed_architecture_is_reported_as_the_model_not_the_optimizer(tmp_path):
    model = torch.nn.Linear(64, 128)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 64)).sum().backward()
    opt.step()
    with savegame.Checkpointer(tmp_path, {"model": model, "optimizer": opt}, async_save=False) as ckpt:
        ckpt.save(1)
    wider = torch.nn.Linear(64, 256)
    state = {"model": wider, "optimizer": torch.optim.Adam(wider.parameters())}
    with savegame.Checkpointer(tmp_path, state) as c, pytest.raises(IncompatibleStateError) as err:
        c.restore()
    assert str(err.value).startswith("state 'model'") and "weight" in str(err.value)
    assert "optimizer" not in str(err.value)


# --- say what happened -------------------------------------------------------------------------

@pytest.mark.parametrize("async_save", [False, True])
def test_each_save_and_restore_is_one_info_line_with_the_full_path(tmp_path, caplog, async_save):
    model = torch.nn.Linear(2, 2)
    with caplog.at_level(logging.INFO, logger="savegame"), \
            savegame.Checkpointer(tmp_path, {"model": model}, async_save=async_save) as ckpt:
        ckpt.restore()
        ckpt.save(1)
        ckpt.wait()
        ckpt.restore()
    path = tmp_path / "step-0000000001"
    saved = [r.getMessage() for r in caplog.records if r.getMessage().startswith("saved checkpoint")]
    assert len(saved) == 1 and re.fullmatch(rf"saved checkpoint {re.escape(str(path))} \([1-9]\d* bytes, "
                                            r"durable \d+\.\d\d s after save\(\)\)", saved[0])
    assert f"restored checkpoint {path} (step 1)" in caplog.text
