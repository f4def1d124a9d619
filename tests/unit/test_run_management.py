"""Run management through the Checkpointer: retention, best, early stopping, aliases, schedule, signals."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

import savegame
from savegame.errors import ConfigurationError, NonFiniteStateError


def steps_on_disk(run) -> list[int]:
    return sorted(int(p.name[5:15]) for p in run.iterdir() if p.name.startswith("step-"))


def make(run, **kwargs):
    model = torch.nn.Linear(2, 2)
    return model, savegame.Checkpointer(run, {"model": model}, async_save=False, **kwargs)


def test_keep_last_and_keep_every_compose(tmp_path):
    _, ckpt = make(tmp_path, keep_last=2, keep_every=4)
    for step in range(1, 11):
        ckpt.save(step)
    ckpt.close()
    assert steps_on_disk(tmp_path) == [4, 8, 9, 10]


def test_best_checkpoints_survive_retention_per_metric(tmp_path):
    _, ckpt = make(tmp_path, keep_last=1, best={"val_loss": "min", "pck": "max"})
    metrics = {1: (0.5, 0.1), 2: (0.2, 0.3), 3: (0.4, 0.9), 4: (0.6, 0.2), 5: (0.7, 0.1)}
    for step, (loss, pck) in metrics.items():
        ckpt.save(step, metrics={"val_loss": loss, "pck": pck})
    assert steps_on_disk(tmp_path) == [2, 3, 5]
    assert ckpt.restore("best").step == 2
    assert ckpt.restore("best:val_loss").step == 2
    assert ckpt.restore("best:pck").step == 3
    ckpt.close()
    aliases = {p.name: json.loads(p.read_text())["target"] for p in tmp_path.glob("*.alias.json")}
    assert aliases["best.alias.json"] == aliases["best__val_loss.alias.json"] == "step-0000000002"
    assert aliases["best__pck.alias.json"] == "step-0000000003"
    assert aliases["latest.alias.json"] == "step-0000000005"


def test_non_finite_metrics_never_become_best(tmp_path):
    _, ckpt = make(tmp_path, best={"val_loss": "min"})
    ckpt.save(1, metrics={"val_loss": 0.5})
    ckpt.save(2, metrics={"val_loss": math.nan})
    ckpt.save(3, metrics={"val_loss": -math.inf})
    assert ckpt.restore("best").step == 1
    ckpt.close()


def test_nan_policy_refuse_keeps_non_finite_states_off_disk(tmp_path):
    _, ckpt = make(tmp_path, nan_policy="refuse")
    ckpt.save(1, metrics={"loss": 1.0})
    with pytest.raises(NonFiniteStateError, match="metric 'loss' = inf is not finite"):
        ckpt.save(2, metrics={"loss": math.inf})
    ckpt.close()
    assert steps_on_disk(tmp_path) == [1]


def test_resume_keeps_best_and_patience(tmp_path):
    """Seed 001: best at epoch 67, resume at 100, a worse epoch 101 must not replace best; a better one does."""
    es = savegame.EarlyStopping("val_loss", mode="min", patience=40)
    _, ckpt = make(tmp_path, keep_last=2, best={"val_loss": "min"}, early_stopping=es)
    for epoch in range(1, 101):
        loss = 0.0987 if epoch == 67 else 0.2 + epoch / 1000
        ckpt.save(epoch, epoch=epoch, metrics={"val_loss": loss})
    ckpt.close()
    assert 67 in steps_on_disk(tmp_path)

    es2 = savegame.EarlyStopping("val_loss", mode="min", patience=40)
    _, ckpt = make(tmp_path, keep_last=2, best={"val_loss": "min"}, early_stopping=es2)
    assert ckpt.restore().step == 100
    assert es2.state_dict()["bad_epochs"] == 33  # patience continues where it was
    ckpt.save(101, epoch=101, metrics={"val_loss": 0.15})
    assert ckpt.restore("best").step == 67
    assert 67 in steps_on_disk(tmp_path)
    ckpt.save(102, epoch=102, metrics={"val_loss": 0.05})
    assert ckpt.restore("best").step == 102
    ckpt.close()
    assert es2.state_dict()["bad_epochs"] == 0


def test_restore_best_follows_the_early_stopping_metric_when_best_is_not_given(tmp_path):
    model, ckpt = make(tmp_path, early_stopping=savegame.EarlyStopping("acc", mode="max", patience=5))
    for step, acc in ((1, 0.5), (2, 0.9), (3, 0.1)):
        with torch.no_grad():
            model.weight.fill_(float(step))
        ckpt.save(step, metrics={"acc": acc})
    assert ckpt.restore("best:acc").step == 2  # 'max' comes from EarlyStopping, not a guess
    assert ckpt.restore("best").step == 2 and model.weight.eq(2.0).all()
    with pytest.raises(ConfigurationError, match=r"best=\{'loss': 'min'\} or best=\{'loss': 'max'\}"):
        ckpt.restore("best:loss")
    ckpt.close()


def test_early_stopping_sets_should_stop(tmp_path):
    es = savegame.EarlyStopping("acc", mode="max", patience=2)
    _, ckpt = make(tmp_path, early_stopping=es)
    for step, acc in enumerate([0.5, 0.6, 0.6, 0.55], start=1):
        ckpt.save(step, metrics={"acc": acc})
    assert ckpt.should_stop
    ckpt.close()


def test_name_format_adds_fields_and_the_step_stays_the_key(tmp_path):
    _, ckpt = make(tmp_path, name_format="e{epoch:03d}-val_loss{val_loss:.4f}")
    path = ckpt.save(12, epoch=3, metrics={"val_loss": 0.123456})
    assert os.path.basename(path) == "step-0000000012-e003-val_loss0.1235"
    assert ckpt.restore(12).step == 12
    with pytest.raises(ConfigurationError, match="name_format"):
        ckpt.save(13, epoch=3, metrics={})
    ckpt.close()


@pytest.mark.parametrize("template,match", [
    ("{}", "every field needs a name"), ("e{0}", "every field needs a name"),
    ("{val.loss:.2f}", r"\{val\.loss\} cannot name a metric"), ("{losses[0]}", "cannot name a metric"),
])
def test_name_format_templates_that_cannot_work_are_refused_at_construction(tmp_path, template, match):
    with pytest.raises(ConfigurationError, match=match):
        make(tmp_path, name_format=template)


def test_name_format_takes_metric_names_with_dashes_and_slashes(tmp_path):
    _, ckpt = make(tmp_path, name_format="{val-loss:.2f}_{val/acc:.1f}")
    path = ckpt.save(1, metrics={"val-loss": 0.25, "val/acc": 0.5})
    assert os.path.basename(path) == "step-0000000001-0.25_0.5"
    ckpt.close()


def test_steps_past_ten_digits_are_found_ordered_and_rotated(tmp_path):
    # Runs that count samples or tokens as the step pass 10**10: the name grows a digit.
    model, ckpt = make(tmp_path, keep_last=2, name_format="e{epoch:03d}")
    for step in (9_999_999_999, 10**10, 10**10 + 7):
        with torch.no_grad():
            model.weight.fill_(float(step % 1000))
        ckpt.save(step, epoch=1)
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step-"))
    assert names == ["step-10000000000-e001", "step-10000000007-e001"]
    with torch.no_grad():
        model.weight.zero_()
    assert ckpt.restore().step == 10**10 + 7
    assert model.weight.eq(7.0).all()
    assert ckpt.restore(10**10).step == 10**10
    assert model.weight.eq(0.0).all()  # 10**10 % 1000
    assert savegame.load(tmp_path)["step"] == 10**10 + 7
    ckpt.close()


def test_saving_the_same_step_twice_keeps_only_the_newest(tmp_path):
    model, ckpt = make(tmp_path)
    ckpt.save(5)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ckpt.save(5)
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step-"))
    assert names == ["step-0000000005.1"]
    with torch.no_grad():
        model.weight.zero_()
    ckpt.restore(5)
    assert model.weight.eq(3.0).all()
    ckpt.close()


def test_metrics_history_is_kept_as_json_lines(tmp_path):
    _, ckpt = make(tmp_path)
    ckpt.save(1, epoch=0, metrics={"loss": 1.0})
    ckpt.save(2, epoch=0, metrics={"loss": math.nan})
    ckpt.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"], r["metrics"]["loss"]) for r in lines] == [(1, 0, 1.0), (2, 0, "nan")]


def test_maybe_save_every_steps(tmp_path):
    _, ckpt = make(tmp_path, every_steps=3)
    saved = [step for step in range(1, 11) if ckpt.maybe_save(step)]
    ckpt.close()
    assert saved == [3, 6, 9]


def test_signal_triggers_a_save_at_the_next_step_then_should_stop(tmp_path):
    _, ckpt = make(tmp_path, every_steps=1000, save_on_signals=(signal.SIGUSR1,))
    assert ckpt.maybe_save(1) is None
    os.kill(os.getpid(), signal.SIGUSR1)  # the handler only sets a flag
    assert not ckpt.should_stop
    assert ckpt.maybe_save(2) is not None
    assert ckpt.should_stop
    ckpt.close()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handler restored on close
    assert steps_on_disk(tmp_path) == [2]


def test_pinned_checkpoints_are_never_deleted(tmp_path):
    _, ckpt = make(tmp_path, keep_last=1)
    ckpt.save(1, pin=True)
    for step in range(2, 5):
        ckpt.save(step)
    ckpt.close()
    assert steps_on_disk(tmp_path) == [1, 4]


def test_resumed_from_checkpoint_is_protected(tmp_path):
    _, ckpt = make(tmp_path, keep_last=1, best={"loss": "min"})
    for step in range(1, 4):
        ckpt.save(step, metrics={"loss": step})
    ckpt.close()
    assert steps_on_disk(tmp_path) == [1, 3]  # 1 is the best, 3 the newest
    _, ckpt = make(tmp_path, keep_last=1)
    ckpt.restore(1)
    ckpt.save(4)
    ckpt.save(5)
    ckpt.close()
    assert steps_on_disk(tmp_path) == [1, 5]  # 1 is what this run resumed from
