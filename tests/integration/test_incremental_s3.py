"""An incremental run on S3 (a real moto server) with a frozen part: the frozen bytes are uploaded once, every
checkpoint restores exactly, retention's freed packs are swept, and ls/verify see the shared pack."""

from __future__ import annotations

import json

import boto3
import torch
from click.testing import CliRunner

import savegame
from savegame.cli import main


def keys(bucket: str, prefix: str = "") -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def test_an_s3_run_with_a_frozen_part_uploads_it_once(run_url: str, bucket: str) -> None:
    torch.manual_seed(0)
    frozen, head = torch.nn.Linear(512, 512), torch.nn.Linear(512, 8)  # 1 MiB frozen
    frozen.requires_grad_(False)
    state = {"frozen": frozen, "head": head}
    expected = {}
    with savegame.Checkpointer(run_url, state, incremental=True, keep_last=3) as ckpt:
        for step in range(5):
            with torch.no_grad():
                head.weight.add_(1.0)
            ckpt.save(step)
            expected[step] = head.weight.clone()
    packs = keys(bucket, "runs/exp1/data/")
    sizes = {o["Key"]: o["Size"] for o in boto3.client("s3").list_objects_v2(
        Bucket=bucket, Prefix="runs/exp1/data/")["Contents"]}
    assert sum(1 for k in packs if sizes[k] > 1 << 20) == 1  # the frozen layer: one upload
    assert len(packs) == 4  # the first save's pack (kept by the frozen layer) and the heads of the three kept
    for step in (2, 3, 4):
        tree = savegame.load(f"{run_url}/step-{step:010d}")
        assert torch.equal(tree["state"]["head"]["weight"], expected[step])
        assert torch.equal(tree["state"]["frozen"]["weight"], frozen.weight)
    rows = json.loads(CliRunner().invoke(main, ["ls", run_url, "--json"]).output)
    assert [r["step"] for r in rows] == [2, 3, 4] and all(r["shared_bytes"] > 1 << 20 for r in rows)
    assert CliRunner().invoke(main, ["verify", run_url]).exit_code == 0
