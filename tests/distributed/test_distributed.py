"""Distributed jobs (gloo, 2 CPU ranks as subprocesses): DDP, FSDP2, resharding, failures, agreement.

Each job sets a 20 s process-group timeout (10 s where a rank dies) and the launcher
an outer timeout, so a hang fails in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch

from tests.distributed import launch

WORKER = str(Path(__file__).with_name("_worker.py"))

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="multi-process gloo tests run on Linux only")


def _listed(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("step-"))


def test_ddp_kill_and_resume_is_bit_identical_per_rank(tmp_path):
    full = launch.results(launch.run(WORKER, 2, "ddp", str(tmp_path / "full"), "-1", "20"))
    assert full[0]["rng"] != full[1]["rng"], "the ranks' RNG streams must differ for this test to mean anything"
    launch.run(WORKER, 2, "ddp", str(tmp_path / "cut"), "10", "20")  # killed at step 10, mid-epoch
    resumed = launch.results(launch.run(WORKER, 2, "ddp", str(tmp_path / "cut"), "-1", "20"))
    for rank, (a, b) in enumerate(zip(full, resumed, strict=True)):
        assert b["resumed_from"] == 9, rank
        assert b["losses"] == a["losses"][-len(b["losses"]):], f"rank {rank} diverged after the resume"
        assert b["digest"] == a["digest"] and b["rng"] == a["rng"], rank
    manifest = json.loads((tmp_path / "cut" / "step-0000000009" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["files"] == ["tensors-00000.safetensors",
                                                                 "tensors-00001.safetensors"]
    keys = manifest["tensors"]["key"]
    assert len([k for k in keys if k.startswith("state.model.")]) == 4, "replicated weights stored once"
    assert {k.split("/")[0] for k in keys if k.startswith("rank")} == {"rank0", "rank1"}
    files = manifest["entries"]["file"]
    shared = [e for k, e in zip(keys, manifest["tensors"]["entry"], strict=True) if k.startswith("state.")]
    assert {files[e] for e in shared} == {0, 1}, "the write work of replicated tensors is spread over the ranks"
    assert _listed(tmp_path / "full") == ["step-0000000012", "step-0000000015", "step-0000000018"]  # keep_last=3
    # 2 -> 1 ranks mid-epoch (step 18 of 8-step epochs): the data position is re-split exactly, RNG not restored
    one = launch.run(WORKER, 1, "ddp", str(tmp_path / "cut"), "-1", "22")
    assert launch.results(one)[0]["resumed_from"] == 18
    assert "RNG states are not restored" in one[0].stderr
    assert "step-0000000003" not in _listed(tmp_path / "cut")


def test_fsdp2_save_restore_and_reshard_2_1_2_and_plain(tmp_path):
    run = str(tmp_path / "run")
    two = launch.results(launch.run(WORKER, 2, "fsdp", run, "train", "3"))
    assert two[0]["state"] == two[1]["state"]
    again = launch.results(launch.run(WORKER, 2, "fsdp", run, "read", "0"))
    assert again[0]["state"] == two[0]["state"] == again[1]["state"], "2 -> 2 restore"
    trained = launch.results(launch.run(WORKER, 1, "fsdp", run, "train", "2"))  # 1 rank goes on, saves step 5
    assert trained[0]["restored"] == two[0]["state"], "2 -> 1 restore"
    back = launch.results(launch.run(WORKER, 2, "fsdp", run, "read", "0"))
    assert back[0]["step"] == 5 and back[0]["state"] == trained[0]["state"] == back[1]["state"], "1 -> 2 restore"
    assert trained[0]["state"] != two[0]["state"]
    plain = launch.results(launch.run(WORKER, 1, "plain", run))
    assert plain[0]["step"] == 5 and plain[0]["state"] == trained[0]["state"], "restore without a process group"
    # outside the job: one plain safetensors file of full tensors
    out = tmp_path / "model.safetensors"
    done = subprocess.run([sys.executable, "-m", "savegame.cli", "export", run, "--to", str(out)],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(launch.ROOT / "src")})
    assert done.returncode == 0, done.stderr
    weights = safetensors.torch.load_file(str(out))
    exported = {f"p.{k}": [float(v) for v in t.double().flatten()] for k, t in weights.items()}
    assert exported == {k: v for k, v in trained[0]["state"].items() if k.startswith("p.")}


def test_a_rank_dying_mid_save_lists_nothing_and_the_next_run_resumes(tmp_path):
    run = tmp_path / "run"
    done = launch.run(WORKER, 2, "die_mid_save", str(run), expect_ok=False, timeout=60)
    assert done[1].returncode == 9
    assert done[0].returncode == 0, done[0].stderr[-3000:]
    report = launch.results(done[:1])[0]
    assert report["error"] and report["error"].split(":")[0] in ("RankFailedError", "StorageError"), report
    assert _listed(run) == ["step-0000000003"], "the interrupted save must not be listed"
    again = launch.results(launch.run(WORKER, 2, "fsdp", str(run), "read", "0"))
    assert again[0]["state"] == again[1]["state"]
    assert not [p for p in os.listdir(run) if p.startswith(".tmp-")], "the next run removes the leftovers"


def test_one_ranks_damaged_part_makes_every_rank_fall_back(tmp_path):
    run = tmp_path / "run"
    launch.run(WORKER, 2, "ddp", str(run), "7", "20")  # saves steps 3 and 6
    newest = run / "step-0000000006"
    manifest = json.loads((newest / "manifest.json").read_text())
    table, entries = manifest["tensors"], manifest["entries"]
    j = table["key"].index("rank1/rng.torch")  # read by rank 1 only
    e = table["entry"][j]
    assert (entries["file"] if isinstance(entries["file"], list) else [entries["file"]] * 99)[e] == 1
    data = bytearray((newest / "tensors-00001.safetensors").read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + entries["start"][e] + 100] ^= 0xFF
    (newest / "tensors-00001.safetensors").write_bytes(bytes(data))
    done = launch.run(WORKER, 2, "ddp", str(run), "-1", "8")
    assert [r["resumed_from"] for r in launch.results(done)] == [3, 3]
    assert all("skipping damaged checkpoint" in c.stderr for c in done), "every rank says why it fell back"


def test_a_signal_on_one_rank_stops_every_rank_after_one_save(tmp_path):
    run = tmp_path / "run"
    res = launch.results(launch.run(WORKER, 2, "signal", str(run)))
    assert [r["stopped"] for r in res] == [5, 5]
    assert _listed(run) == ["step-0000000005"]


def test_a_per_rank_state_without_a_resplit_rule_is_refused_then_taken_approximately(tmp_path):
    run = str(tmp_path / "run")
    launch.run(WORKER, 2, "per_rank", run)
    (res,) = launch.results(launch.run(WORKER, 1, "per_rank", run))
    assert res["refused"] and "resplit='approximate'" in res["refused"] and "'counter'" in res["refused"]
    assert res["untouched"], "a refused restore leaves the model as it was"
    assert res["step"] == 1 and res["counter"] == 7 and res["loaded"]  # new rank 0 takes old rank 0 % 2's state


@pytest.mark.cuda
def test_one_rank_nccl_job_on_a_gpu_saves_and_restores_exactly(tmp_path):
    res = launch.results(launch.run(WORKER, 1, "nccl", str(tmp_path / "run"), timeout=180))
    assert res[0] == {"rank": 0, "step": 3, "exact": True, "cuda_rng": True, "on_gpu": True}
