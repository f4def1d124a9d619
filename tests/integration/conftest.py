"""Fixtures of the integration tests: a real S3 server (moto) per session and a fresh bucket per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.integration.s3server import aws_environment, moto_server


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (one per test session); the tests using it skip without the s3 extras."""
    pytest.importorskip("s3fs", reason="the s3 extra is not installed (pip install 'savegame[s3,test]')")
    pytest.importorskip("moto", reason="moto[server] is not installed (pip install 'savegame[test]')")
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_env(s3_endpoint: str) -> Iterator[dict[str, str]]:
    with aws_environment(s3_endpoint) as env:
        yield env


@pytest.fixture
def bucket(s3_env: dict[str, str]) -> str:
    import boto3
    name = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def run_url(bucket: str) -> str:
    return f"s3://{bucket}/runs/exp1"
