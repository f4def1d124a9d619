"""Faults of the object store, injected by a loopback proxy in front of a real S3 server: transient ones are
retried and the save succeeds; permanent ones raise StorageError with the URL and the remedy, and lose
nothing already committed."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

import savegame
from savegame.errors import StorageError
from savegame.storage import retry
from tests.helpers import make_state
from tests.integration.s3proxy import FaultProxy, fault_proxy


@pytest.fixture
def proxied(bucket: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    with fault_proxy(s3_endpoint) as (endpoint, proxy):
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        yield proxy


def blob(mb: int, value: float) -> dict[str, torch.nn.Module]:
    model = torch.nn.Module()
    model.register_buffer("big", torch.full((mb << 18,), value))
    return {"blob": model}


@pytest.mark.parametrize("threshold", [None, 1 << 30], ids=["multipart", "single-put"])
def test_transient_faults_are_retried(run_url: str, proxied: FaultProxy, threshold: int | None,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry, "BACKOFF", 0.01)  # what is tested is that each fault is retried, not the waits
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # and retried by savegame: botocore's own retries would hide them
    budget = {"503": 2, "reset": 2}  # at most four failures of one request: its fifth attempt goes through
    upload = "partNumber" if threshold is None else ".safetensors"  # a part, or the one PUT of a whole tensor file

    def fault(method: str, path: str) -> str | None:
        if method == "PUT" and upload in path or method == "GET" and "step-" in path:
            for kind, left in budget.items():
                if left:
                    budget[kind] -= 1
                    return kind
        return None
    state = blob(20, 3.0)  # by default (multipart): three parts, two of 8 MiB and the rest
    options = {} if threshold is None else {"multipart_threshold": threshold}
    with savegame.Checkpointer(run_url, state=state, storage_options=options) as ckpt:
        proxied.fault = fault
        ckpt.save(1)
        ckpt.wait()
        assert sorted(kind for kind, method, _ in proxied.injected if method == "PUT") == ["503", "503", "reset", "reset"]
        budget.update({"503": 2, "reset": 2})  # and again while it reads back
        state["blob"].big.zero_()
        assert ckpt.restore().step == 1  # type: ignore[union-attr]
    assert torch.equal(state["blob"].big, torch.full((20 << 18,), 3.0))
    reads = [kind for kind, method, _ in proxied.injected if method == "GET"]
    assert reads.count("503") == 2 and reads.count("reset") == 2


def test_access_denied_raises_with_the_url_and_keeps_what_is_committed(run_url: str, proxied: FaultProxy) -> None:
    state = make_state(0)
    with savegame.Checkpointer(run_url, state=state) as ckpt:
        ckpt.save(1)
        ckpt.wait()
        proxied.fault = lambda method, path: "403" if method in ("PUT", "POST") else None
        ckpt.save(2)
        with pytest.raises(StorageError, match=rf"{run_url}.*access denied: check that the credentials"):
            ckpt.wait()
        proxied.fault = lambda method, path: None
    assert [e.step for e in savegame.list_checkpoints(run_url)] == [1]


def test_missing_bucket_and_missing_credentials(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(StorageError, match=r"s3://no-such-bucket-x/run.*the bucket 'no-such-bucket-x' does not exist"):
        savegame.Checkpointer("s3://no-such-bucket-x/run", state=make_state(0))
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path) + "/none")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path) + "/none")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError, match=r"s3://some-bucket/run.*no credentials were found: set AWS_ACCESS_KEY_ID"):
        savegame.Checkpointer("s3://some-bucket/run", state=make_state(0))
