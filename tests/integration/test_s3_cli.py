"""The CLI on runs in an object store (a real moto S3 server): ``migrate --to s3://...`` and the byte
progress of ``verify``, ``ls --verify`` and ``export``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import boto3
import pytest
import torch
from click.testing import CliRunner, Result

import savegame
from savegame.cli import _progress, export, main, runs
from tests.compat.make_foreign import build


def cli(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def sizes(bucket: str, prefix: str) -> dict[str, int]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"][len(prefix):]: o["Size"] for page in pages for o in page.get("Contents", [])}


def assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("savegame: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_migrate_to_s3_then_ls_verify_and_restore_exactly(run_url: str, bucket: str, tmp_path: Path) -> None:
    built = build("000-nested-rng", tmp_path / "foreign")
    done = cli("migrate", built.source, "--to", run_url)
    assert done.exit_code == 0, done.output
    name = f"step-{built.step:010d}"
    assert f"wrote {run_url}/{name}" in done.stdout

    stored = sizes(bucket, "runs/exp1/")
    assert f"{name}/manifest.json" in stored and "metrics.jsonl" in stored and "latest.alias.json" in stored
    assert ".savegame.lease" not in stored  # the import held the run's lease, and handed it back
    listed = cli("ls", "--json", run_url)
    assert listed.exit_code == 0 and f'"path": "{run_url}/{name}"' in listed.stdout, listed.output
    checked = cli("verify", run_url)
    assert checked.exit_code == 0 and "all 1 checkpoint(s) intact" in checked.stdout, checked.output

    fresh = built.fresh()
    with savegame.Checkpointer(run_url, state=fresh, async_save=False) as ckpt:
        assert ckpt.restore().step == built.step
        built.assert_restored(fresh)
        # while a writer holds the run, an import into it is refused, in one line
        assert_one_line_error(cli("migrate", built.source, "--to", run_url), "another process is writing to the run",
                              run_url)
    assert list(sizes(bucket, "runs/exp1/")) == list(stored)  # the refused import wrote nothing


def test_migrate_to_a_bad_url_is_one_line(s3_env: dict[str, str], tmp_path: Path) -> None:
    source = tmp_path / "weights.pt"
    torch.save({"weight": torch.ones(2)}, source)
    assert_one_line_error(cli("migrate", source, "--to", "s3://no-such-bucket-for-migrate/run"),
                          "s3://no-such-bucket-for-migrate/run", "the bucket 'no-such-bucket-for-migrate' does not exist")
    for url in ("s3://", "s3:///run"):  # no bucket at all
        result = cli("migrate", source, "--to", url)
        assert_one_line_error(result, url)
        assert "unexpected" not in result.stderr and "Traceback" not in result.output


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
    model = torch.nn.Linear(256, 256)  # 257 KiB of weights: two tensor files of at most 200 KiB, and the RNG's
    with savegame.Checkpointer(run_url, state={"model": model}, shard_bytes=200 << 10) as ckpt:
        ckpt.save(1)
        ckpt.save(2)
    files = {n: size for n, size in sizes(bucket, "runs/exp1/").items() if n.startswith("step-")}
    newest = {n: size for n, size in files.items() if n.startswith("step-0000000002/")}
    assert sum(n.endswith(".safetensors") for n in newest) == 3

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
