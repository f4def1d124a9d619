"""A 2-rank FSDP2 job saving to and restoring from one s3:// run (a real moto server): every rank writes
its own file under the same checkpoint prefix, rank 0 holds the lease and writes the manifest last."""

from __future__ import annotations

import sys
from pathlib import Path

import boto3
import pytest

from tests.distributed import launch

WORKER = str(Path(launch.__file__).with_name("_worker.py"))

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="multi-process gloo tests run on Linux only")


def test_two_ranks_save_and_restore_one_s3_run(run_url: str, bucket: str) -> None:
    saved = launch.results(launch.run(WORKER, 2, "fsdp", run_url, "train", "3"))
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="runs/exp1/")
    names = sorted(o["Key"] for page in pages for o in page.get("Contents", []))
    assert {"runs/exp1/step-0000000003/manifest.json", "runs/exp1/step-0000000003/tensors-00000.safetensors",
            "runs/exp1/step-0000000003/tensors-00001.safetensors"} <= set(names)
    again = launch.results(launch.run(WORKER, 2, "fsdp", run_url, "read", "0"))
    assert again[0]["state"] == again[1]["state"] == saved[0]["state"]
    plain = launch.results(launch.run(WORKER, 1, "plain", run_url))
    assert plain[0]["step"] == 3 and plain[0]["state"] == saved[0]["state"]
