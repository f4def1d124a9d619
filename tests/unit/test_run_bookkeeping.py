"""Bookkeeping after a save: retention, aliases, re-saves, best, early stopping, history, lineage, logging."""

from __future__ import annotations

import errno
import json
import logging
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import savegame
from savegame.errors import CheckpointNotFoundError, ConfigurationError, StorageError
from savegame.run.directory import alias_file, alias_of_file
from savegame.storage import FaultyStorage, LocalStorage


def steps_on_disk(run) -> list[int]:
    return sorted(int(p.name[5:15]) for p in run.iterdir() if p.name.startswith("step-"))


def make(run, **kwargs):
    model = torch.nn.Linear(2, 2)
    return model, savegame.Checkpointer(run, {"model": model}, async_save=False, **kwargs)


def history(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --- 1: retention runs even when the rest of the bookkeeping fails -----------------------------

@pytest.mark.parametrize("broken", ["append", "alias"])
def test_retention_runs_when_history_or_aliases_cannot_be_written(tmp_path, broken, caplog):
    def fail_if(op: str, path: str) -> bool:
        if broken == "append":
            return op == "append"
        return op == "create" and ".alias.json" in path

    faulty = FaultyStorage(LocalStorage(tmp_path), errno_=errno.ENOSPC, fail_if=fail_if)
    _, ckpt = make(tmp_path, keep_last=2, storage=faulty)
    for step in range(1, 6):
        ckpt.save(step)
    ckpt.close()
    assert steps_on_disk(tmp_path) == [4, 5]  # the disk does not fill up
    assert "could not be updated" in caplog.text and "disk is full" in caplog.text


def test_a_metric_with_a_path_separator_gets_a_working_alias(tmp_path):
    _, ckpt = make(tmp_path, keep_last=1, best={"val/loss": "min"})
    for step, loss in ((1, 0.5), (2, 0.1), (3, 0.7)):
        ckpt.save(step, metrics={"val/loss": loss})
    assert steps_on_disk(tmp_path) == [2, 3]
    assert ckpt.restore("best:val/loss").step == 2
    ckpt.close()
    pointer = json.loads((tmp_path / "best__val%2Floss.alias.json").read_text())
    assert pointer == {"alias": "best:val/loss", "target": "step-0000000002", "metric": "val/loss", "mode": "min",
                       "value": 0.1, "step": 2}


@settings(deadline=None, max_examples=200)
@given(st.text(min_size=1, max_size=40))
def test_alias_file_names_are_safe_and_reversible(metric):
    name = alias_file(f"best:{metric}")
    assert "/" not in name and "\\" not in name and ":" not in name and "\x00" not in name
    assert alias_of_file(name) == f"best:{metric}"
    assert alias_of_file(alias_file("latest")) == "latest"


def test_plain_metric_alias_names_keep_their_documented_spelling():
    assert alias_file("best:val_loss") == "best__val_loss.alias.json"
    assert alias_of_file(".tmp-best.alias.json-1234") is None


# --- 2: a re-save replaces its step, but never a pinned save -----------------------------------

def test_a_re_save_keeps_the_pinned_earlier_save_of_the_step(tmp_path):
    model, ckpt = make(tmp_path)
    first = ckpt.save(5, pin=True)
    with torch.no_grad():
        model.weight.fill_(3.0)
    second = ckpt.save(5)
    third = ckpt.save(5)
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step-"))
    assert names == ["step-0000000005", "step-0000000005.2"]  # the pinned first and the newest
    assert first.endswith("step-0000000005") and second.endswith(".1") and third.endswith(".2")
    with torch.no_grad():
        model.weight.zero_()
    assert ckpt.restore(5).path == third and model.weight.eq(3.0).all()  # the newest save of the step
    ckpt.close()


def test_without_retention_every_step_is_kept(tmp_path):
    _, ckpt = make(tmp_path, best="loss")
    for step in range(1, 6):
        ckpt.save(step, metrics={"loss": float(step)})
    ckpt.close()
    assert steps_on_disk(tmp_path) == [1, 2, 3, 4, 5]


# --- 3: restore("best") learns the metric and its mode from the run -----------------------------

def test_best_of_a_metric_not_in_best_takes_the_mode_stored_in_the_run(tmp_path):
    _, ckpt = make(tmp_path, best={"loss": "min", "pck": "max"})
    for step, (loss, pck) in enumerate([(0.5, 0.2), (0.3, 0.9), (0.4, 0.1)], start=1):
        ckpt.save(step, metrics={"loss": loss, "pck": pck})
    ckpt.close()
    _, plain = make(tmp_path)  # no best=
    assert plain.restore("best:pck").step == 2  # maximised, as recorded; never the worst
    assert plain.restore("best:loss").step == 2
    assert plain.restore("best").step == 2  # the first tracked metric of the run
    with pytest.raises(ConfigurationError, match="'acc' is not tracked.*best=\\{'acc': 'min'\\}"):
        plain.restore("best:acc")
    with pytest.raises(ConfigurationError, match="best:"):
        plain.restore("best:")
    plain.close()


def test_best_without_any_tracked_metric_says_what_to_pass(tmp_path):
    _, ckpt = make(tmp_path)
    ckpt.save(1, metrics={"loss": 0.1})
    with pytest.raises(ConfigurationError, match="no metric is tracked.*best=\\{'val_loss': 'min'\\}"):
        ckpt.restore("best")
    ckpt.close()


def test_best_state_stored_in_each_checkpoint_is_the_ranking_of_the_run(tmp_path):
    _, ckpt = make(tmp_path, keep_last=1, best={"loss": "min"}, best_k=2)
    for step, loss in enumerate([0.5, 0.2, 0.9, 0.2, 0.1, 0.7], start=1):
        ckpt.save(step, metrics={"loss": loss})
        stored = savegame.load(tmp_path)["run"]["best"]["loss"]
        ranked = ckpt._tracker.best_names("best:loss")[:2]
        assert [f"step-{s:010d}" for _, s in stored["entries"]] == ranked
    path = ckpt.save(5, metrics={"loss": 0.95})  # a re-save replaces step 5's value: the ranking follows
    assert savegame.load(path)["run"]["best"]["loss"]["entries"] == [[0.2, 2], [0.7, 6]]
    assert ckpt._tracker.best_names("best:loss") == ["step-0000000002", "step-0000000006", "step-0000000005.1"]
    ckpt.close()


# --- 4: nothing is recorded unless the save is accepted -----------------------------------------

def test_a_rejected_save_changes_neither_best_nor_patience(tmp_path):
    es = savegame.EarlyStopping("loss", mode="min", patience=2)
    _, ckpt = make(tmp_path, best="loss", early_stopping=es, name_format="v{val:.2f}")
    ckpt.save(1, metrics={"loss": 0.5, "val": 1.0})
    before = es.state_dict()
    for bad in ({"loss": 0.9}, {"loss": 0.9, "val": 1.0, "x": "nope"}):  # no 'val' for the name; a non-number
        with pytest.raises(ConfigurationError):
            ckpt.save(2, metrics=bad)
    with pytest.raises(savegame.errors.UnsupportedValueError):
        ckpt.save(2, metrics={"loss": 0.9, "val": 1.0}, extra={"f": lambda: 1})
    assert es.state_dict() == before and not ckpt.should_stop
    ckpt.save(2, metrics={"loss": 0.9, "val": 1.0})
    assert es.state_dict()["bad_epochs"] == 1
    ckpt.close()


def test_a_background_failure_rolls_the_tracker_back_and_logs_no_new_best(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="savegame")
    es = savegame.EarlyStopping("loss", mode="min", patience=1)
    faulty = FaultyStorage(LocalStorage(tmp_path))
    ckpt = savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(2, 2)}, best="loss", early_stopping=es,
                                 storage=faulty)
    ckpt.save(1, metrics={"loss": 0.5})
    ckpt.wait()
    faulty.fail_if = lambda op, path: op == "write"
    ckpt.save(2, metrics={"loss": 0.9})  # would trigger early stopping
    with pytest.raises(StorageError):
        ckpt.wait()
    assert not ckpt.should_stop and es.state_dict()["bad_epochs"] == 0 and es.state_dict()["last_step"] == 1
    caplog.clear()
    ckpt.save(3, metrics={"loss": 0.1})
    with pytest.raises(StorageError):
        ckpt.wait()
    faulty.fail_if = None
    assert "new best" not in caplog.text  # never announced for a save that did not become durable
    ckpt.save(4, metrics={"loss": 0.2})
    ckpt.close()
    assert "new best loss=0.1" not in caplog.text and "new best loss=0.2 at step 4" in caplog.text
    assert es.state_dict()["bad_epochs"] == 0 and es.state_dict()["best"] == 0.2


def test_saving_a_step_again_does_not_count_twice_against_patience(tmp_path):
    es = savegame.EarlyStopping("loss", mode="min", patience=2)
    _, ckpt = make(tmp_path, early_stopping=es)
    ckpt.save(1, metrics={"loss": 0.5})
    ckpt.save(2, metrics={"loss": 0.6})
    ckpt.save(2, metrics={"loss": 0.6})  # e.g. a signal-driven save right after the epoch's save
    assert not ckpt.should_stop and es.state_dict()["bad_epochs"] == 1
    ckpt.close()


# --- 5: the metrics history survives a torn line and follows the resumed line --------------------

def test_a_torn_last_history_line_does_not_swallow_the_next_record(tmp_path, caplog):
    _, ckpt = make(tmp_path)
    ckpt.save(1, metrics={"loss": 1.0})
    ckpt.close()
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 2, "epoch": null, "metr')  # a crash cut this append
    _, ckpt = make(tmp_path)
    ckpt.restore()
    ckpt.save(3, metrics={"loss": 0.5})
    ckpt.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["step"] == 3 and "torn line" in caplog.text
    from savegame.run.history import History
    assert [r["step"] for r in History(LocalStorage(tmp_path)).records()] == [1, 3]


def test_resuming_from_an_older_checkpoint_moves_the_continuation_aside(tmp_path, caplog):
    model, ckpt = make(tmp_path, keep_last=10)
    for step in range(1, 6):
        with torch.no_grad():
            model.weight.fill_(step)
        ckpt.save(step, metrics={"loss": float(step)})
    assert ckpt.restore(3).step == 3
    assert steps_on_disk(tmp_path) == [1, 2, 3, 4, 5]  # a restore alone moves nothing
    with torch.no_grad():
        model.weight.fill_(40.0)
    ckpt.save(4, metrics={"loss": 40.0})
    ckpt.close()
    assert steps_on_disk(tmp_path) == [1, 2, 3, 4]
    aside = tmp_path / "abandoned" / "after-step-0000000003"
    assert sorted(p.name for p in aside.iterdir()) == ["metrics.jsonl", "step-0000000004", "step-0000000005"]
    assert [r["step"] for r in history(tmp_path)] == [1, 2, 3, 4]
    assert [r["step"] for r in history(aside)] == [4, 5]
    assert "resumed from step-0000000003, which was not the newest" in caplog.text
    _, again = make(tmp_path)
    info = again.restore()
    assert info.step == 4 and info.metrics == {"loss": 40.0}  # the new line wins, not the old step 5
    again.close()


def test_restoring_the_newest_checkpoint_moves_nothing(tmp_path):
    _, ckpt = make(tmp_path)
    for step in (1, 2):
        ckpt.save(step)
    ckpt.restore()
    ckpt.save(3)
    ckpt.close()
    assert steps_on_disk(tmp_path) == [1, 2, 3] and not (tmp_path / "abandoned").exists()


# --- 6: a checkpoint restored by its path is protected like one restored by step ------------------

@pytest.mark.parametrize("how", ["dir", "manifest", "relative-dots"])
def test_restoring_by_a_path_inside_the_run_protects_that_checkpoint(tmp_path, how):
    _, ckpt = make(tmp_path, keep_last=1)
    paths = {step: ckpt.save(step) for step in (1, 2, 3)}
    ckpt.close()
    _, ckpt = make(tmp_path, keep_last=1)
    target = {"dir": paths[3], "manifest": f"{paths[3]}/manifest.json",
              "relative-dots": f"{tmp_path}/../{tmp_path.name}/step-0000000003"}[how]
    ckpt.restore(target)
    ckpt.save(4)
    ckpt.save(5)
    ckpt.close()
    assert steps_on_disk(tmp_path) == [3, 5]


# --- 11: what retention logs, and damaged checkpoints warned once --------------------------------

def test_retention_logs_why_it_keeps_and_deletes(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="savegame")
    _, ckpt = make(tmp_path, keep_last=1, keep_every=2, best="loss")
    for step, loss in ((1, 0.1), (2, 0.5), (3, 0.6), (4, 0.7), (5, 0.8)):
        ckpt.save(step, metrics={"loss": loss})
    ckpt.close()
    text = caplog.text
    assert "deleting checkpoint step-0000000003: kept by none of keep_last(1), keep_every(2)" in text
    assert "step-0000000001 (keep_best('loss', 'min', 1))" in text
    assert "step-0000000004 (newest, protected, keep_last(1), keep_every(2))" in text


def test_a_damaged_checkpoint_is_reported_once_not_at_every_save(tmp_path, caplog):
    _, ckpt = make(tmp_path, keep_last=5)
    ckpt.save(1)
    ckpt.save(2)
    ckpt.close()
    (tmp_path / "step-0000000001" / "manifest.json").write_bytes(b"{broken")
    _, ckpt = make(tmp_path, keep_last=5)
    assert ckpt.restore().step == 2
    for step in range(3, 6):
        ckpt.save(step)
    ckpt.close()
    assert caplog.text.count("skipping checkpoint step-0000000001") == 1
    assert steps_on_disk(tmp_path) == [1, 2, 3, 4, 5]  # a damaged checkpoint is never deleted by retention


def test_restore_of_a_missing_step_is_not_found(tmp_path):
    _, ckpt = make(tmp_path)
    ckpt.save(1, metrics={"loss": math.nan})
    with pytest.raises(CheckpointNotFoundError):
        ckpt.restore(2)
    ckpt.close()
