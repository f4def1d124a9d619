"""The endpoint and credentials of an object store given only through ``storage_options`` (no AWS
environment, no config file): every path, the bulk transfers included, reaches the store with them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch

import savegame
from savegame.errors import ConfigurationError, StorageError
from tests.helpers import assert_same_state, make_state, train_steps
from tests.integration.s3proxy import FaultProxy, fault_proxy
from tests.integration.s3server import CREDENTIALS

KEY, SECRET = CREDENTIALS["AWS_ACCESS_KEY_ID"], CREDENTIALS["AWS_SECRET_ACCESS_KEY"]


@pytest.fixture
def no_aws_env(bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """The bucket (made with the environment's credentials), then no AWS setting left in the environment."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return bucket


def blob_state(seed: int) -> dict[str, Any]:
    """The usual trio and a 3 MB buffer: the tensor file goes up and comes back through the bulk client
    (a botocore client built from the s3fs settings), not through s3fs."""
    state = make_state(seed)
    blob = torch.nn.Module()
    blob.register_buffer("big", torch.randn(3 << 18, generator=torch.Generator().manual_seed(seed)))
    return {**state, "blob": blob}


def test_save_restore_list_and_load_with_options_only(no_aws_env: str, s3_endpoint: str) -> None:
    url = f"s3://{no_aws_env}/runs/opts"
    with pytest.raises(StorageError, match="no credentials were found"):  # the environment really is empty
        savegame.list_checkpoints(url)
    # s3fs takes the endpoint at the top level or in client_kwargs: one spelling writes, the other reads back
    top_level = {"key": KEY, "secret": SECRET, "endpoint_url": s3_endpoint}
    in_client = {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": s3_endpoint}}

    state = blob_state(0)
    train_steps(state, 2)
    # s3fs's per-request options reach every request too: here, encryption at rest (a bucket policy may demand it)
    encrypted = {**top_level, "s3_additional_kwargs": {"ServerSideEncryption": "AES256"}}
    with savegame.Checkpointer(url, state=state, storage_options=encrypted) as ckpt:
        ckpt.save(2, metrics={"loss": 0.25})
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                      region_name="us-east-1")
    for file in ("manifest.json", "tensors-00000.safetensors"):
        head = s3.head_object(Bucket=no_aws_env, Key=f"runs/opts/step-0000000002/{file}")
        assert head.get("ServerSideEncryption") == "AES256", file
    for options in (top_level, in_client):
        assert [(e.step, e.metrics) for e in savegame.list_checkpoints(url, storage_options=options)] == \
            [(2, {"loss": 0.25})]

    fresh = blob_state(1)
    with savegame.Checkpointer(url, state=fresh, storage_options=in_client) as ckpt:
        assert ckpt.restore().step == 2
    assert_same_state(state, fresh)
    assert torch.equal(fresh["blob"].big, state["blob"].big)
    loaded = savegame.load(url, storage_options=in_client)
    assert loaded["step"] == 2 and torch.equal(loaded["state"]["blob"]["big"], state["blob"].big)


@pytest.fixture
def checking_keys(no_aws_env: str, s3_endpoint: str) -> Iterator[tuple[str, FaultProxy]]:
    """A proxy in front of the server that refuses every access key but the right one (moto accepts any)."""
    with fault_proxy(s3_endpoint) as (endpoint, proxy):
        proxy.keys = {KEY}
        yield endpoint, proxy


def test_wrong_credentials_raise_one_storage_error_and_lose_nothing(no_aws_env: str,
                                                                    checking_keys: tuple[str, FaultProxy]) -> None:
    endpoint, proxy = checking_keys
    url = f"s3://{no_aws_env}/runs/keys"
    good = {"key": KEY, "secret": SECRET, "endpoint_url": endpoint}
    bad = {**good, "key": "AKIAWRONGWRONGWRONG"}
    state = make_state(0)
    with savegame.Checkpointer(url, state=state, storage_options=good) as ckpt:
        ckpt.save(1)
    assert not proxy.injected

    with pytest.raises(StorageError, match=rf"{url}.*access denied: check that the credentials.*storage_options"):
        savegame.Checkpointer(url, state=make_state(1), storage_options=bad)
    with pytest.raises(StorageError, match=rf"{url}.*access denied"):
        savegame.list_checkpoints(url, storage_options=bad)
    assert proxy.injected and {kind for kind, _, _ in proxy.injected} == {"403-key"}

    assert [e.step for e in savegame.list_checkpoints(url, storage_options=good)] == [1]
    loaded = savegame.load(url, storage_options=good)
    assert loaded["step"] == 1
    for key, value in state["model"].state_dict().items():
        assert torch.equal(loaded["state"]["model"][key], value), key


def test_unknown_storage_option_is_a_configuration_error(no_aws_env: str, s3_endpoint: str) -> None:
    url = f"s3://{no_aws_env}/runs/typo"
    options = {"key": KEY, "secret": SECRET, "endpoint_url": s3_endpoint}
    with pytest.raises(ConfigurationError, match=r"unknown storage_options \['secret_key'\]"):
        savegame.Checkpointer(url, state=make_state(0), storage_options={**options, "secret_key": SECRET})
    with pytest.raises(ConfigurationError, match=r"unknown storage_options \['endpoint'\]"):
        savegame.list_checkpoints(url, storage_options={**options, "endpoint": s3_endpoint})
    # botocore's own session options (here a profile) are known: the error is about the profile, not the option
    with pytest.raises(StorageError, match="no-such-profile"):
        savegame.list_checkpoints(url, storage_options={**options, "profile": "no-such-profile"})
