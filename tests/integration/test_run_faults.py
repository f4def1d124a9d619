"""A run directory survives kills, full disks, bit rot and crashes during retention."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import savegame
from savegame.engine.reader import verify_checkpoint
from savegame.errors import StorageError
from savegame.run.directory import RunDir
from savegame.run.history import History
from savegame.storage import FaultyStorage, InjectedFault, LocalStorage
from tests.integration.procs import child_env

HERE = Path(__file__).parent


def listed(run_dir: Path) -> list[str]:
    return RunDir(LocalStorage(run_dir)).names()


def test_file_size_limit_during_a_save_is_a_clear_error_and_loses_nothing(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, str(HERE / "_fsize_child.py"), str(run_dir)], capture_output=True,
                         text=True, timeout=120, env=child_env(), check=False)
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stderr
    assert lines[0] == "ok 1" and lines[-1] == "ok 3"
    assert lines[1].startswith("error StorageError:") and "file size limit" in lines[1]
    assert listed(run_dir) == ["step-0000000001", "step-0000000003"]
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".tmp-")]
    for name in listed(run_dir):
        assert verify_checkpoint(LocalStorage(run_dir), name) == []


def test_crash_during_retention_deletes_nothing_that_should_stay(tmp_path):
    def prepare(run_dir: Path) -> None:
        with savegame.Checkpointer(run_dir, {"m": torch.nn.Linear(4, 4)}, async_save=False) as ckpt:
            for step in (1, 2, 3):
                ckpt.save(step)

    probe = tmp_path / "probe"
    prepare(probe)
    faulty = FaultyStorage(LocalStorage(probe))
    with savegame.Checkpointer(probe, {"m": torch.nn.Linear(4, 4)}, storage=faulty, keep_last=2,
                               async_save=False) as ckpt:
        ckpt.restore()  # the same run, continued
        start = len(faulty.ops)
        ckpt.save(4)
        total = len(faulty.ops) - start
    assert listed(probe) == ["step-0000000003", "step-0000000004"]
    for op in range(total):
        run_dir = tmp_path / f"run{op}"
        prepare(run_dir)
        faulty = FaultyStorage(LocalStorage(run_dir), crash=True)
        ckpt = savegame.Checkpointer(run_dir, {"m": torch.nn.Linear(4, 4)}, storage=faulty, keep_last=2,
                                     async_save=False)
        ckpt.restore()
        faulty.fail_at = len(faulty.ops) + op
        with pytest.raises(InjectedFault):
            ckpt.save(4)
        ckpt._lock.release()
        names = listed(run_dir)
        assert "step-0000000003" in names, (op, names)
        assert set(names) <= {f"step-000000000{i}" for i in (1, 2, 3, 4)}
        for name in names:
            assert verify_checkpoint(LocalStorage(run_dir), name) == [], (op, name)


def corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) * 2 // 3] ^= 0x10
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(bytes(data[: len(data) // 2]))


@pytest.mark.parametrize("how", ["flip", "truncate"])
@pytest.mark.parametrize("target", ["manifest.json", "tensors-00000.safetensors"])
def test_damage_is_caught_by_verify_and_restore_falls_back(tmp_path, target, how, caplog):
    model = torch.nn.Linear(64, 64)
    with savegame.Checkpointer(tmp_path, {"model": model}, async_save=False) as ckpt:
        for step in (1, 2):
            with torch.no_grad():
                model.weight.fill_(step)
            ckpt.save(step)
    corrupt(tmp_path / "step-0000000002" / target, how)
    problems = verify_checkpoint(LocalStorage(tmp_path), "step-0000000002")
    assert problems and "step-0000000002" in problems[0]
    assert verify_checkpoint(LocalStorage(tmp_path), "step-0000000001") == []
    with savegame.Checkpointer(tmp_path, {"model": model}) as ckpt:
        info = ckpt.restore()
    assert info.step == 1 and model.weight.eq(1.0).all()
    assert "skipping damaged checkpoint step-0000000002" in caplog.text or "skipping checkpoint step-0000000002" in caplog.text


def test_damaged_alias_file_is_only_a_hint(tmp_path):
    with savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(2, 2)}, best={"loss": "min"}, async_save=False) as c:
        c.save(1, metrics={"loss": 0.1})
        c.save(2, metrics={"loss": 0.5})
    (tmp_path / "best.alias.json").write_bytes(b"\x00garbage")
    (tmp_path / "latest.alias.json").write_text('{"target": "step-0000000099"}')
    with savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(2, 2)}, best={"loss": "min"}) as c:
        assert c.restore("best").step == 1
        assert c.restore().step == 2


def test_two_processes_on_one_run_dir(tmp_path):
    code = (
        "import sys, torch, savegame\n"
        "from savegame.errors import RunLockedError\n"
        "try:\n"
        "    savegame.Checkpointer(sys.argv[1], {'m': torch.nn.Linear(1, 1)})\n"
        "except RunLockedError as e:\n"
        "    print('locked:', e)\n"
    )
    with savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(1, 1)}):
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                             timeout=60, env=child_env(), check=False)
    assert out.stdout.startswith("locked: another process is writing"), out.stderr


def test_an_io_error_during_a_save_is_clear_loses_nothing_and_training_goes_on(tmp_path, caplog):
    model = torch.nn.Linear(64, 64)
    faulty = FaultyStorage(LocalStorage(tmp_path), errno_=errno.EIO)
    with savegame.Checkpointer(tmp_path, {"model": model}, storage=faulty, keep_last=2) as ckpt:
        for step in (1, 2):
            with torch.no_grad():
                model.weight.fill_(step)
            ckpt.save(step)
        ckpt.wait()
        faulty.fail_if = lambda op, path: op == "close" and path.endswith(".safetensors")
        ckpt.save(3)
        with pytest.raises(StorageError, match="Input/output error; the device reported an I/O error"):
            ckpt.wait()
        faulty.fail_if = None
        ckpt.save(4)
    assert listed(tmp_path) == ["step-0000000002", "step-0000000004"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    # an I/O error while reading the newest checkpoint: restore falls back to the one before
    faulty = FaultyStorage(LocalStorage(tmp_path), fail_if=lambda op, path: "step-0000000004/tensors" in path)
    with savegame.Checkpointer(tmp_path, {"model": model}, storage=faulty) as ckpt:
        info = ckpt.restore()
    assert info.step == 2 and model.weight.eq(2.0).all()
    assert "skipping damaged checkpoint step-0000000004" in caplog.text


@pytest.mark.parametrize("how", ["flip", "truncate", "point-elsewhere"])
def test_a_damaged_best_alias_is_only_a_hint_and_is_rewritten(tmp_path, how):
    with savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(2, 2)}, best={"loss": "min"}, async_save=False) as c:
        for step, loss in ((1, 0.5), (2, 0.1), (3, 0.7)):
            c.save(step, metrics={"loss": loss})
    alias = tmp_path / "best.alias.json"
    if how == "point-elsewhere":  # a valid pointer at the wrong checkpoint (a bit flip in a digit)
        alias.write_text(alias.read_text().replace("step-0000000002", "step-0000000003"))
    else:
        corrupt(alias, how)
    with savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(2, 2)}, best={"loss": "min"}, async_save=False) as c:
        assert c.restore("best").step == 2
        c.save(4, metrics={"loss": 0.9})
    assert json.loads(alias.read_text())["target"] == "step-0000000002"


@pytest.mark.parametrize("how", ["flip", "truncate", "garbage-line"])
def test_a_damaged_metrics_history_is_skipped_where_damaged_and_appended_cleanly(tmp_path, how):
    with savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(2, 2)}, async_save=False) as c:
        for step in range(1, 5):
            c.save(step, metrics={"loss": step / 10})
    path = tmp_path / "metrics.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    if how == "flip":
        damaged = bytearray(lines[1])
        damaged[3] ^= 0x40  # '"step"' no longer parses as JSON
        path.write_bytes(b"".join([lines[0], bytes(damaged), *lines[2:]]))
    elif how == "truncate":
        path.write_bytes(b"".join(lines)[:-7])
    else:
        path.write_bytes(b"".join([lines[0], b"\x00\xff not json\n", *lines[1:]]))
    with savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(2, 2)}, async_save=False) as c:
        assert c.restore(2).step == 2
        c.save(3, metrics={"loss": 0.33})  # resumed from 2: history past step 2 moves aside
        c.save(4, metrics={"loss": 0.44})
    steps = [r["step"] for r in History(LocalStorage(tmp_path)).records()]
    assert steps == ([1, 2, 3, 4] if how != "flip" else [1, 3, 4])
    aside = History(LocalStorage(tmp_path / "abandoned" / "after-step-0000000002")).records()
    assert [r["step"] for r in aside] == ([3] if how == "truncate" else [3, 4])
    assert json.loads(path.read_bytes().splitlines()[-1])["metrics"] == {"loss": 0.44}


def alias_targets(run_dir: Path) -> dict[str, str]:
    out = {}
    for p in run_dir.glob("*.alias.json"):
        out[p.name] = json.loads(p.read_text())["target"]
    return out


def test_no_crash_during_a_save_leaves_an_alias_naming_a_deleted_checkpoint(tmp_path):
    """The new save becomes best and retention deletes the old best: the aliases move first."""
    def prepare(run_dir: Path) -> None:
        with savegame.Checkpointer(run_dir, {"m": torch.nn.Linear(4, 4)}, keep_last=1, best="loss",
                                   async_save=False) as ckpt:
            ckpt.save(1, metrics={"loss": 0.5})
            ckpt.save(2, metrics={"loss": 0.9})  # step 1 stays as the best

    probe = tmp_path / "probe"
    prepare(probe)
    faulty = FaultyStorage(LocalStorage(probe))
    with savegame.Checkpointer(probe, {"m": torch.nn.Linear(4, 4)}, storage=faulty, keep_last=1, best="loss",
                               async_save=False) as ckpt:
        ckpt.restore()
        start = len(faulty.ops)
        ckpt.save(3, metrics={"loss": 0.1})
        total = len(faulty.ops) - start
    # the old best (step 1) is deleted by this save; step 2, restored from, stays protected for one save
    assert listed(probe) == ["step-0000000002", "step-0000000003"]
    for op in range(total):
        run_dir = tmp_path / f"run{op}"
        prepare(run_dir)
        faulty = FaultyStorage(LocalStorage(run_dir), crash=True)
        ckpt = savegame.Checkpointer(run_dir, {"m": torch.nn.Linear(4, 4)}, storage=faulty, keep_last=1,
                                     best="loss", async_save=False)
        ckpt.restore()
        faulty.fail_at = len(faulty.ops) + op
        with pytest.raises(InjectedFault):
            ckpt.save(3, metrics={"loss": 0.1})
        ckpt._lock.release()
        names = listed(run_dir)
        for alias, target in alias_targets(run_dir).items():
            assert target in names, (op, faulty.ops[faulty.fail_at], alias, target, names)


def test_prune_re_derives_best_from_the_manifests_when_an_alias_is_stale(tmp_path):
    with savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(2, 2)}, best="loss", async_save=False) as ckpt:
        for step, loss in ((1, 0.9), (2, 0.1), (3, 0.5), (4, 0.7)):
            ckpt.save(step, metrics={"loss": loss})
    for name in ("best.alias.json", "best__loss.alias.json"):  # as a crash between a deletion and the rewrite left it
        doc = json.loads((tmp_path / name).read_text())
        (tmp_path / name).write_text(json.dumps({**doc, "target": "step-0000000000"}))
    (tmp_path / "retention.json").unlink(missing_ok=True)  # what the run's settings say is not needed either: the alias says min
    out = subprocess.run([sys.executable, "-m", "savegame.cli", "prune", str(tmp_path), "--keep-last", "1"],
                         capture_output=True, text=True, timeout=120, env=child_env(), check=False)
    assert out.returncode == 0, out.stderr
    assert listed(tmp_path) == ["step-0000000002", "step-0000000004"], out.stdout


def test_prune_honours_the_runs_keep_every_and_best_k(tmp_path):
    with savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(2, 2)}, keep_last=100, keep_every=5,
                               best={"loss": "min", "acc": "max"}, best_k=2, async_save=False) as ckpt:
        for step in range(1, 13):
            ckpt.save(step, metrics={"loss": (step * 7 % 13) / 13, "acc": (step * 5 % 11) / 11})
    assert json.loads((tmp_path / "retention.json").read_text()) == {
        "keep_last": 100, "keep_every": 5, "best": {"loss": "min", "acc": "max"}, "best_k": 2}
    for p in tmp_path.glob("*.alias.json"):
        p.unlink()  # prune needs no alias file
    from click.testing import CliRunner

    from savegame.cli import main
    dry = CliRunner().invoke(main, ["prune", str(tmp_path), "--keep-last", "1", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "keep_every=5 of the run" in dry.output and "best 2 loss (min)" in dry.output
    assert "best 2 acc (max)" in dry.output and "newest 1" in dry.output
    assert len(listed(tmp_path)) == 12
    assert CliRunner().invoke(main, ["prune", str(tmp_path), "--keep-last", "1"]).exit_code == 0
    losses = {s: (s * 7 % 13) / 13 for s in range(1, 13)}
    accs = {s: (s * 5 % 11) / 11 for s in range(1, 13)}
    best_loss = sorted(losses, key=lambda s: (losses[s], s))[:2]
    best_acc = sorted(accs, key=lambda s: (-accs[s], s))[:2]
    wanted = sorted({5, 10, 12, *best_loss, *best_acc})
    assert listed(tmp_path) == [f"step-{s:010d}" for s in wanted]


def test_a_damaged_retention_settings_file_is_ignored_and_rewritten(tmp_path, caplog):
    (tmp_path / "retention.json").write_bytes(b"[" * 100_000)
    from click.testing import CliRunner

    from savegame.cli import main
    with savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(2, 2)}, async_save=False) as ckpt:
        ckpt.save(1)
        ckpt.save(2)
    (tmp_path / "retention.json").write_bytes(b'{"keep_last": 0, "keep_every": "x", "best": [], "best_k": true}')
    result = CliRunner().invoke(main, ["prune", str(tmp_path), "--keep-last", "1"])
    assert result.exit_code == 0, result.output
    assert "ignoring retention.json" in result.output
    assert listed(tmp_path) == ["step-0000000002"]
    with savegame.Checkpointer(tmp_path, {"m": torch.nn.Linear(2, 2)}, keep_last=3, async_save=False) as ckpt:
        ckpt.restore()
        ckpt.save(3)
    assert json.loads((tmp_path / "retention.json").read_text())["keep_last"] == 3
