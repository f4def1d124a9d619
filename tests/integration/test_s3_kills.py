"""A writer SIGKILLed during a large upload to S3: nothing partial is listed, and the next writer takes the
lease over once it expires, cleans up and resumes from the newest durable checkpoint."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import boto3
import pytest
import torch

import savegame
from savegame.errors import RunLockedError
from tests.integration.procs import child_env

CHILD = Path(__file__).with_name("_s3_writer_child.py")
LEASE = 9.0  # renewed every 3 s: after a kill it stays fresh for at least 6 s, and the check comes within 1-2 s


def objects(bucket: str, prefix: str) -> list[str]:
    reply = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for o in reply.get("Contents", [])]


def uploading(bucket: str, prefix: str) -> bool:
    s3 = boto3.client("s3")
    return bool(objects(bucket, prefix) or s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads"))


def test_sigkill_during_upload_then_takeover_after_lease_expiry(run_url: str, bucket: str,
                                                                s3_env: dict[str, str]) -> None:
    step2 = "runs/exp1/step-0000000002/"
    proc = subprocess.Popen([sys.executable, str(CHILD), run_url, str(LEASE)], stdout=subprocess.PIPE, text=True,
                            env={**child_env(), **s3_env})
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "saved 1"
        assert proc.stdout.readline().strip() == "saving 2"
        deadline = time.monotonic() + 30
        while not uploading(bucket, step2):  # kill once the upload is under way
            assert time.monotonic() < deadline and proc.poll() is None, "the upload never started"
            time.sleep(0.01)
        proc.kill()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if any(key.endswith("manifest.json") for key in objects(bucket, step2)):  # pragma: no cover - timing
        pytest.skip("the upload finished before the kill landed (machine too fast for this test's state size)")

    model = torch.nn.Module()
    model.register_buffer("big", torch.zeros(48 << 18))
    options = {"lease_seconds": LEASE}
    with pytest.raises(RunLockedError, match="lease is held by process"):  # the dead writer's lease is fresh
        savegame.Checkpointer(run_url, state={"blob": model}, storage_options=options)
    assert [e.step for e in savegame.list_checkpoints(run_url)] == [1]  # the partial one is never listed
    deadline = time.monotonic() + 10 * LEASE
    while True:  # admitted once the lease expires (no renewal from a dead writer)
        try:
            ckpt = savegame.Checkpointer(run_url, state={"blob": model}, storage_options=options)
            break
        except RunLockedError:
            assert time.monotonic() < deadline, "the dead writer's lease was never taken over"
            time.sleep(0.2)
    with ckpt:
        assert not objects(bucket, step2)  # its partial objects were cleaned up, its unfinished uploads aborted
        assert not boto3.client("s3").list_multipart_uploads(Bucket=bucket, Prefix=step2).get("Uploads")
        info = ckpt.restore()
        assert info is not None and info.step == 1
        assert torch.equal(model.big, torch.ones(48 << 18))
        ckpt.save(2)
    assert [e.step for e in savegame.list_checkpoints(run_url)] == [1, 2]


WRITER = textwrap.dedent("""
    import sys
    from savegame.storage.urls import open_storage
    storage = open_storage(sys.argv[1])
    handle = storage.create(f"step-0000000005/tensors-0000{sys.argv[2]}.safetensors")
    handle.write(memoryview(bytes([int(sys.argv[2])]) * (6 << 20)))
    handle.close()
""")


def test_several_processes_write_objects_under_one_checkpoint(run_url: str, bucket: str,
                                                              s3_env: dict[str, str]) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, run_url, str(rank)], env={**child_env(), **s3_env})
             for rank in range(2)]
    try:
        assert [p.wait(60) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    s3 = boto3.client("s3")
    for rank in range(2):
        body = s3.get_object(Bucket=bucket, Key=f"runs/exp1/step-0000000005/tensors-0000{rank}.safetensors")["Body"]
        assert body.read() == bytes([rank]) * (6 << 20)
