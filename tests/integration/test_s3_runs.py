"""Run directories on S3 (a real moto server), through the public API and the CLI."""

from __future__ import annotations

import json

import boto3
import pytest
import torch
from click.testing import CliRunner

import savegame
from savegame.cli import main
from savegame.errors import CheckpointNotFoundError, ConfigurationError, RunLockedError
from savegame.storage import s3io
from savegame.storage.s3io import SINGLE_PUT
from savegame.storage.urls import open_storage
from tests.helpers import make_state, train_steps


def keys(bucket: str, prefix: str = "") -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def big_state(mb: int = 40) -> dict[str, torch.nn.Module]:
    torch.manual_seed(1)
    model = torch.nn.Module()
    model.register_buffer("big", torch.randn(mb << 18))  # mb MB of float32: several 8 MiB parts
    model.register_buffer("small", torch.arange(10))
    return {"blob": model}


def test_round_trip_is_exact_with_multipart_and_several_files(run_url: str, bucket: str) -> None:
    state = {**make_state(0), **big_state(40)}
    train_steps(state, 3)
    rng_before = torch.get_rng_state()
    with savegame.Checkpointer(run_url, state=state, shard_bytes=24 << 20) as ckpt:
        path = ckpt.save(3, metrics={"loss": 0.5}, extra={"note": "s3"})
        ckpt.wait()
    assert path == f"{run_url}/step-0000000003"
    files = keys(bucket, "runs/exp1/step-0000000003/")
    assert files[-1].endswith("tensors-00002.safetensors") and any(f.endswith("manifest.json") for f in files)
    assert ".savegame.lease" not in " ".join(keys(bucket))  # handed back at close
    s3 = boto3.client("s3")
    heads = [s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED") for key in files]
    large = [h for h in heads if h["ContentLength"] > SINGLE_PUT]  # up in parts, each part's CRC32 named
    assert large and all("-" in h["ETag"] and h.get("ChecksumCRC32") for h in large), large  # "-": multipart

    fresh = {**make_state(7), **big_state(1)}
    fresh["blob"].big = torch.zeros(40 << 18)
    with savegame.Checkpointer(run_url, state=fresh) as ckpt:
        info = ckpt.restore()
    assert info is not None and info.step == 3 and info.path == path and info.extra == {"note": "s3"}
    assert torch.equal(fresh["blob"].big, state["blob"].big)
    for k, v in state["optimizer"].state_dict()["state"][0].items():
        assert torch.equal(v, fresh["optimizer"].state_dict()["state"][0][k])
    assert torch.equal(torch.get_rng_state(), rng_before)

    loaded = savegame.load(run_url)
    assert loaded["step"] == 3 and torch.equal(loaded["state"]["blob"]["big"], state["blob"].big)
    assert savegame.load(f"{path}/manifest.json")["metrics"] == {"loss": 0.5}


@pytest.mark.parametrize("async_save", [True, False], ids=["staged", "sync"])
def test_tensor_bytes_go_up_without_a_copy_into_part_buffers(run_url: str, async_save: bool,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """An async save sends the staged bytes as they are: only headers and small objects are copied into the
    client's part buffers. A sync save writes from the live tensors through those buffers, and is exact too."""
    taken: list[int] = []
    take = s3io.BufferPool.take
    monkeypatch.setattr(s3io.BufferPool, "take", lambda self: taken.append(1) or take(self))
    state = big_state(40)  # five parts
    with savegame.Checkpointer(run_url, state=state, async_save=async_save) as ckpt:
        ckpt.save(1)
        ckpt.wait()
        taken.clear()
        ckpt.save(2)
        ckpt.wait()
    saved = savegame.load(run_url)
    assert saved["step"] == 2 and torch.equal(saved["state"]["blob"]["big"], state["blob"].big)
    files = len(open_storage(run_url).list_dir("step-0000000002"))  # the tensor files and the manifest
    if async_save:
        assert len(taken) <= files, taken  # one buffer a file, for what is not lent; not one a part
    else:
        assert len(taken) >= (40 << 20) // s3io.PART


def test_retention_best_and_aliases(run_url: str, bucket: str) -> None:
    state = make_state(0)
    losses = [0.9, 0.3, 0.5, 0.6, 0.7]
    with savegame.Checkpointer(run_url, state=state, keep_last=2, best={"loss": "min"}) as ckpt:
        for step, loss in enumerate(losses):
            ckpt.save(step, metrics={"loss": loss})
        ckpt.wait()
    entries = savegame.list_checkpoints(run_url)
    assert [e.step for e in entries] == [1, 3, 4]  # the best (step 1) and the last two
    assert {e.step: e.aliases for e in entries}[1] == ("best", "best:loss")
    assert "latest" in entries[-1].aliases
    stored = keys(bucket, "runs/exp1/")
    assert not [k for k in stored if "step-0000000000" in k or "step-0000000002" in k]  # deleted whole
    alias = json.loads(boto3.client("s3").get_object(Bucket=bucket, Key="runs/exp1/best.alias.json")["Body"].read())
    assert alias["target"] == "step-0000000001"
    history = boto3.client("s3").get_object(Bucket=bucket, Key="runs/exp1/metrics.jsonl")["Body"].read()
    assert [json.loads(line)["step"] for line in history.splitlines()] == [0, 1, 2, 3, 4]  # rewritten, not appended

    other = make_state(3)
    with savegame.Checkpointer(run_url, state=other, best={"loss": "min"}) as ckpt:
        info = ckpt.restore("best")
        assert info is not None and info.step == 1
        assert ckpt.path_of("latest") == f"{run_url}/step-0000000004"
    assert savegame.load(run_url, which="best")["step"] == 1
    assert savegame.load(f"{run_url}@3")["step"] == 3


def test_a_checkpoint_without_manifest_is_not_listed_and_is_cleaned_up(run_url: str, bucket: str) -> None:
    with savegame.Checkpointer(run_url, state=make_state(0)) as ckpt:
        ckpt.save(1)
    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket, Key="runs/exp1/step-0000000002/tensors-00000.safetensors", Body=b"partial")
    s3.put_object(Bucket=bucket, Key="runs/exp1/step-0000000003/manifest-less", Body=b"x")
    assert [e.step for e in savegame.list_checkpoints(run_url)] == [1]
    assert savegame.load(run_url)["step"] == 1
    with savegame.Checkpointer(run_url, state=make_state(0)) as ckpt:  # the writer cleans up
        assert ckpt.restore().step == 1  # type: ignore[union-attr]
    assert not [k for k in keys(bucket) if "step-0000000002" in k or "step-0000000003" in k]


def test_deletion_removes_the_manifest_first(run_url: str) -> None:
    storage = open_storage(run_url)
    calls: list[str] = []
    remove, remove_tree = storage.remove, storage.remove_tree
    storage.remove = lambda p: (calls.append(f"remove {p}"), remove(p))[1]  # type: ignore[method-assign]
    storage.remove_tree = lambda p: (calls.append(f"remove_tree {p}"), remove_tree(p))[1]  # type: ignore[method-assign]
    with savegame.Checkpointer(run_url, state=make_state(0), keep_last=1, storage=storage) as ckpt:
        ckpt.save(1)
        ckpt.save(2)
        ckpt.wait()
    deleting = [c for c in calls if "step-0000000001" in c]
    assert deleting == ["remove step-0000000001/manifest.json", "remove_tree step-0000000001"]


def test_second_writer_is_refused_while_the_lease_is_fresh(run_url: str) -> None:
    options = {"lease_seconds": 30}
    with savegame.Checkpointer(run_url, state=make_state(0), storage_options=options) as first:
        first.save(1)
        with pytest.raises(RunLockedError, match=r"process \d+ on host .* fresh for \d+ s"):
            savegame.Checkpointer(run_url, state=make_state(0), storage_options=options)
    with savegame.Checkpointer(run_url, state=make_state(0), storage_options=options) as again:  # released
        assert again.restore().step == 1  # type: ignore[union-attr]


def test_missing_run_and_bad_options(run_url: str) -> None:
    with pytest.raises(CheckpointNotFoundError):
        savegame.list_checkpoints(run_url + "-missing")
    with pytest.raises(ConfigurationError, match="lease_seconds"):
        savegame.Checkpointer(run_url, state=make_state(0), storage_options={"lease_seconds": -1})


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_cli_ls_verify_inspect_export_prune(run_url: str, bucket: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    state = make_state(0)
    with savegame.Checkpointer(run_url, state=state, best={"loss": "min"}) as ckpt:
        for step, loss in enumerate([0.5, 0.2, 0.4]):
            ckpt.save(step, metrics={"loss": loss})
    code, out = cli("ls", "--json", run_url)
    assert code == 0, out
    rows = json.loads(out)
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[1]["aliases"] == ["best", "best:loss"]
    assert rows[0]["path"] == f"{run_url}/step-0000000000" and rows[0]["bytes"] > 0
    code, out = cli("verify", run_url)
    assert code == 0 and "all 3 checkpoint(s) intact" in out, out
    code, out = cli("inspect", "--json", f"{run_url}@best")
    assert code == 0, out
    shown = json.loads(out)
    assert shown["step"] == 1 and shown["path"] == f"{run_url}/step-0000000001"
    assert shown["files"][0]["bytes"] > 0
    target = tmp_path / "w.safetensors"
    code, out = cli("export", run_url, "--to", str(target))
    assert code == 0 and target.exists(), out
    code, out = cli("prune", run_url, "--keep-last", "1")
    assert code == 0, out
    assert [r["step"] for r in json.loads(cli("ls", "--json", run_url)[1])] == [1, 2]

    # damage one byte of a tensor file: verify finds it
    s3 = boto3.client("s3")
    key = "runs/exp1/step-0000000002/tensors-00000.safetensors"
    data = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[-1] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    code, out = cli("verify", run_url)
    assert code == 1 and "DAMAGED step-0000000002" in out, out


def test_a_forked_child_never_hands_back_its_parents_lease(run_url: str) -> None:
    import os
    with savegame.Checkpointer(run_url, state=make_state(0)) as ckpt:
        pid = os.fork()
        if pid == 0:  # the child: closing its copy must leave the parent's lease alone
            try:
                ckpt._lock.release()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert open_storage(run_url).exists(".savegame.lease")
        ckpt.save(1)
    assert not open_storage(run_url).exists(".savegame.lease")


def test_a_lease_created_meanwhile_refuses_the_second_writer(run_url: str) -> None:
    from savegame.run.lease import RunLease
    storage = open_storage(run_url)
    first, second = RunLease(storage, 30), RunLease(open_storage(run_url), 30)
    second._read = lambda: None  # type: ignore[method-assign]  # it looked before the first wrote
    first.acquire()
    try:
        with pytest.raises(RunLockedError, match="at the same time"):
            second.acquire()  # the store refuses to create the lease object again (If-None-Match)
    finally:
        first.release()
