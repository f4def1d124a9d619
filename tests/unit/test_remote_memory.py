"""Object-store runs through fsspec's memory:// store: the same code as s3:// without a server
(the generic fsspec path: files opened through fsspec, no multipart)."""

from __future__ import annotations

import time
import uuid

import pytest
import torch

import savegame
from savegame.errors import ConfigurationError, RunLockedError, StorageError
from savegame.run.lease import RunLease
from savegame.storage.urls import is_url, open_storage
from tests.helpers import make_state, train_steps


@pytest.fixture
def url() -> str:
    return f"memory://runs-{uuid.uuid4().hex[:8]}/exp"


def test_is_url() -> None:
    assert is_url("s3://b/x") and is_url("memory://x") and is_url("gs://b")
    assert not is_url("runs/x") and not is_url("/abs/x") and not is_url("file:///x") and not is_url("c://x")


def test_memory_round_trip_retention_and_manifest_last(url: str) -> None:
    state = make_state(0)
    train_steps(state, 2)
    with savegame.Checkpointer(url, state=state, keep_last=2) as ckpt:
        for step in range(4):
            ckpt.save(step, metrics={"loss": 1.0 / (step + 1)})
    assert [e.step for e in savegame.list_checkpoints(url)] == [2, 3]
    storage = open_storage(url)
    storage.remove("step-0000000003/manifest.json")  # as if the save of step 3 had not committed
    assert [e.step for e in savegame.list_checkpoints(url)] == [2]
    other = make_state(5)
    with savegame.Checkpointer(url, state=other) as ckpt:
        assert ckpt.restore().step == 2  # type: ignore[union-attr]
    assert not storage.exists("step-0000000003")  # the writer removed the uncommitted objects
    assert savegame.load(url)["step"] == 2


def test_storage_options_are_refused_for_local_paths(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(savegame.errors.ConfigurationError, match="storage_options are for URLs"):
        savegame.Checkpointer(tmp_path, state=make_state(0), storage_options={"anon": True})


def test_missing_objects_raise_storage_error_with_the_url(url: str) -> None:
    with pytest.raises(StorageError, match=rf"{url}/nothing.*does not exist"):
        open_storage(url).read_bytes("nothing")


def test_a_writer_that_stalls_past_its_lease_commits_nothing(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    options = {"lease_seconds": 0.5}
    with monkeypatch.context() as patch:
        patch.setattr(RunLease, "_renew", lambda self: None)  # a writer frozen: it never renews
        stalled = savegame.Checkpointer(url, state=make_state(0), storage_options=options)
    stalled.save(1)
    stalled.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            newcomer = savegame.Checkpointer(url, state=make_state(0), storage_options=options)
            break
        except RunLockedError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    with newcomer:
        stalled.save(2)
        with pytest.raises(RunLockedError, match="lost the lease"):
            stalled.wait()
        assert [e.step for e in savegame.list_checkpoints(url)] == [1]
    stalled.close()


def test_fresh_moves_the_old_run_aside_on_an_object_store(url: str) -> None:
    with savegame.Checkpointer(url, state=make_state(0)) as ckpt:
        ckpt.save(1, metrics={"loss": 1.0})
        ckpt.save(2, metrics={"loss": 0.5})
    with savegame.Checkpointer(url, state=make_state(0), fresh=True) as ckpt:
        assert ckpt.restore() is None
    storage = open_storage(url)
    [folder] = storage.list_dir("abandoned")
    assert storage.list_dir(f"abandoned/{folder}") == ["latest.alias.json", "metrics.jsonl", "retention.json",
                                                       "step-0000000001",
                                                       "step-0000000002"]
    assert storage.exists(f"abandoned/{folder}/step-0000000002/manifest.json")
    assert not storage.exists("step-0000000001") and not storage.exists("metrics.jsonl")



def test_a_new_run_refused_on_a_url_names_the_url(url: str) -> None:
    with savegame.Checkpointer(url, state=make_state(0), async_save=False) as ckpt:
        ckpt.save(1)
    with savegame.Checkpointer(url, state=make_state(0), async_save=False) as again:
        with pytest.raises(ConfigurationError, match=rf"^{url} already holds the checkpoints of a run"):
            again.save(2)
