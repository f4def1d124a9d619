"""Bad input gets one clear savegame error; int-likes are accepted; the run lock and signal handlers are tidy."""

from __future__ import annotations

import errno
import gc
import math
import signal

import numpy as np
import pytest
import torch

import savegame
from savegame.errors import (
    ConfigurationError,
    NonFiniteStateError,
    RunLockedError,
    SavegameError,
    StorageError,
)
from savegame.run import lock as run_lock
from savegame.run.schedule import SaveSchedule
from savegame.storage import FaultyStorage, LocalStorage


def make(run, **kwargs):
    model = torch.nn.Linear(2, 2)
    return model, savegame.Checkpointer(run, {"model": model}, async_save=False, **kwargs)


# --- 9: arguments ----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, arg", [
    ({"async_save": "no"}, "async_save"), ({"verify": "yes"}, "verify"), ({"shard_bytes": "big"}, "shard_bytes"),
    ({"shard_bytes": 1.5}, "shard_bytes"), ({"shard_bytes": True}, "shard_bytes"), ({"storage": object()}, "storage"),
    ({"save_on_signals": "SIGTERM"}, "save_on_signals"), ({"save_on_signals": (1.5,)}, "save_on_signals"),
    ({"every_seconds": math.inf}, "every_seconds"), ({"every_seconds": True}, "every_seconds"),
    ({"keep_last": 2.0}, "keep_last"), ({"best_k": True}, "best_k"), ({"early_stopping": "loss"}, "early_stopping"),
    ({"name_format": "e{epoch"}, "name_format"), ({"name_format": 3}, "name_format"),
])
def test_bad_options_are_named_before_anything_is_written(tmp_path, kwargs, arg):
    with pytest.raises(ConfigurationError, match=arg):
        savegame.Checkpointer(tmp_path / "run", {"m": torch.nn.Linear(1, 1)}, **kwargs)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("run_dir", [123, None, b"runs/x"])
def test_a_run_dir_that_is_not_a_path_is_a_configuration_error(run_dir):
    with pytest.raises(ConfigurationError, match="run_dir"):
        savegame.Checkpointer(run_dir, {"m": torch.nn.Linear(1, 1)})


def test_int_likes_are_accepted_as_steps_and_a_single_signal_as_save_on_signals(tmp_path):
    _, ckpt = make(tmp_path, keep_last=np.int64(2), save_on_signals=signal.SIGUSR1)
    ckpt.save(np.int64(7), epoch=np.int32(1))
    ckpt.save(torch.tensor(8), epoch=torch.tensor(1, dtype=torch.int16))
    assert ckpt.restore(np.int64(7)).step == 7
    assert ckpt.restore(torch.tensor(8)).step == 8
    ckpt.close()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


@pytest.mark.parametrize("which", [3.0, b"x", ["x"], True, -1, torch.tensor(1.0), object()])
def test_restore_rejects_what_is_not_a_step_alias_or_path(tmp_path, which):
    _, ckpt = make(tmp_path)
    ckpt.save(1)
    with pytest.raises(ConfigurationError, match="restore"):
        ckpt.restore(which)
    ckpt.close()


@pytest.mark.parametrize("step", [1.0, "3", True, -1, torch.tensor(2.5), torch.tensor([1, 2])])
def test_save_rejects_steps_that_are_not_non_negative_integers(tmp_path, step):
    _, ckpt = make(tmp_path)
    with pytest.raises(ConfigurationError, match="step"):
        ckpt.save(step)
    with pytest.raises(ConfigurationError, match="pin"):
        ckpt.save(1, pin="yes")
    with pytest.raises(ConfigurationError, match="strict"):
        ckpt.restore(strict=1)
    ckpt.close()


def test_nan_policy_refuse_also_refuses_non_finite_model_state(tmp_path):
    model, ckpt = make(tmp_path, nan_policy="refuse")
    ckpt.save(1)
    with torch.no_grad():
        model.bias[1] = math.nan
    with pytest.raises(NonFiniteStateError, match="state 'model.bias'.*nan_policy='refuse'"):
        ckpt.save(2)
    with torch.no_grad():
        model.bias[1] = 0.0
    ckpt.save(3)
    ckpt.close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step-")) == [
        "step-0000000001", "step-0000000003"]


# --- 8: the run lock ----------------------------------------------------------------------------

@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK])
def test_a_file_system_without_locks_is_not_reported_as_another_writer(tmp_path, monkeypatch, code):
    def no_locks(fd: int) -> None:
        raise OSError(code, "not supported here")

    monkeypatch.setattr(run_lock, "_lock", no_locks)
    with pytest.raises(StorageError, match="does not support file locks.*-o flock") as err:
        savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(1, 1)})
    assert not isinstance(err.value, RunLockedError)


def test_a_lock_file_that_cannot_be_opened_is_a_storage_error(tmp_path):
    (tmp_path / ".savegame.lock").mkdir()  # os.open of a directory for writing fails (EISDIR)
    with pytest.raises(StorageError, match="open the lock file"):
        savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(1, 1)})


def test_a_failed_construction_leaves_no_handler_and_no_lock(tmp_path):
    before = signal.getsignal(signal.SIGUSR2)
    with pytest.raises(ConfigurationError, match="SIGKILL|signal"):  # SIGKILL cannot be handled
        savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(1, 1)}, save_on_signals=(signal.SIGUSR2, signal.SIGKILL))
    assert signal.getsignal(signal.SIGUSR2) is before
    with savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(1, 1)}, save_on_signals=(signal.SIGUSR2,)):
        # the second one is refused by the lock before it installs anything
        with pytest.raises(RunLockedError):
            savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(1, 1)}, save_on_signals=(signal.SIGUSR1,))
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGUSR2) is before


def test_a_checkpointer_dropped_without_close_releases_its_lock(tmp_path):
    ckpt = savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(1, 1)}, save_on_signals=(signal.SIGUSR2,))
    ckpt.save(1)
    ckpt.wait()
    del ckpt  # a notebook cell run again: the old object is gone, its lock and handler with it
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL
    with savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(1, 1)}) as again:
        assert again.restore().step == 1


def test_an_unreachable_unclosed_checkpointer_in_a_cycle_is_collected_to_free_the_lock(tmp_path):
    holder: dict = {}
    holder["self"] = holder
    holder["ckpt"] = savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(1, 1)})
    gc.disable()
    try:
        del holder  # only the cycle keeps it alive now; the lock asks the collector before refusing
        savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(1, 1)}).close()
    finally:
        gc.enable()


def test_a_closed_checkpointer_refuses_work_with_a_savegame_error(tmp_path):
    _, ckpt = make(tmp_path)
    ckpt.close()
    for call in (lambda: ckpt.save(1), lambda: ckpt.restore(), lambda: ckpt.maybe_save(1)):
        with pytest.raises(SavegameError, match="closed"):
            call()


# --- preemption: injected clock, a failed signal-driven save is retried --------------------------

def test_every_seconds_uses_the_injected_monotonic_clock():
    now = [100.0]
    schedule = SaveSchedule(every_steps=None, every_seconds=0.5, signals=(), clock=lambda: now[0])
    assert schedule.due(1) == (False, None)
    now[0] += 0.5
    assert schedule.due(2) == (True, None)
    schedule.saved(2)
    now[0] += 0.4
    assert schedule.due(3) == (False, None)


def test_a_failed_signal_driven_save_is_retried_at_the_next_step(tmp_path):
    faulty = FaultyStorage(LocalStorage(tmp_path), errno_=errno.ENOSPC)
    _, ckpt = make(tmp_path, storage=faulty, save_on_signals=(signal.SIGUSR1,))
    signal.raise_signal(signal.SIGUSR1)
    faulty.fail_if = lambda op, path: op == "write"
    with pytest.raises(StorageError, match="disk is full"):
        ckpt.maybe_save(1)
    assert not ckpt.should_stop
    faulty.fail_if = None
    assert ckpt.maybe_save(2) is not None and ckpt.should_stop
    ckpt.close()


def test_a_lock_file_that_cannot_be_written_is_a_storage_error_and_releases_the_lock(tmp_path, monkeypatch):
    def full(fd: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_lock.os, "ftruncate", full)
    with pytest.raises(StorageError, match="write the lock file.*disk is full"):
        savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(1, 1)})
    monkeypatch.undo()
    savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(1, 1)}).close()  # nothing was left locked
