"""The CLI on runs in an object store (a real moto S3 server): the byte progress of ``verify``,
``ls --verify`` and ``export``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import boto3
import pytest
import torch
from click.testing import CliRunner, Result

import savegame
from savegame.cli import _progress, export, main, runs


def cli(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def sizes(bucket: str, prefix: str) -> dict[str, int]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"][len(prefix):]: o["Size"] for page in pages for o in page.get("Contents", [])}


class Recorded(_progress.ByteProgress):
    """A progress that records each phase: [description, total, bytes advanced]."""

    phases: ClassVar[list[list[Any]]] = []

    def phase(self, description: str, total: int) -> None:
        Recorded.phases.append([description, total, 0])
        super().phase(description, total)

    def advance(self, nbytes: int) -> None:
        Recorded.phases[-1][2] += nbytes
        super().advance(nbytes)


def test_verify_ls_and_export_progress_count_every_byte_of_an_s3_checkpoint(
        run_url: str, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for module in (runs, export):
        monkeypatch.setattr(module, "ByteProgress", Recorded)
    monkeypatch.setattr(Recorded, "phases", [])
    model = torch.nn.Linear(256, 256)  # 257 KiB of weights: two tensor files of at most 200 KiB
    with savegame.Checkpointer(run_url, state={"model": model}, shard_bytes=200 << 10) as ckpt:
        ckpt.save(1)
        ckpt.save(2)
    files = {n: size for n, size in sizes(bucket, "runs/exp1/").items() if n.startswith("step-")}
    newest = {n: size for n, size in files.items() if n.startswith("step-0000000002/")}
    assert sum(n.endswith(".safetensors") for n in newest) == 2

    assert cli("verify", run_url).exit_code == 0
    assert cli("ls", "--verify", run_url).exit_code == 0
    assert cli("export", run_url, "--to", tmp_path / "w.safetensors").exit_code == 0
    weights = 257 * 256 * 4
    assert Recorded.phases == [
        ["verifying", sum(files.values()), sum(files.values())],  # both checkpoints: every file's bytes, once
        ["verifying", sum(files.values()), sum(files.values())],
        ["verifying step-0000000002", sum(newest.values()), sum(newest.values())],
        ["exporting model", weights, weights],
    ]
