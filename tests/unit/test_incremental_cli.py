"""The command line over incremental runs: ls shows own and shared bytes, verify names every checkpoint using
a damaged pack, prune reclaims the packs it freed, export writes a stand-alone file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from click.testing import CliRunner, Result
from safetensors.torch import load_file

import savegame
from savegame.cli import main
from savegame.engine.reader import read_manifest
from savegame.format import names as n
from savegame.run.store import ContentStore
from savegame.storage import LocalStorage


def cli(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def incremental_run(path: Path, saves: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 4))
    model[0].requires_grad_(False)
    ckpt = savegame.Checkpointer(path, {"model": model}, incremental=True)
    for step in range(saves):
        with torch.no_grad():
            model[1].weight.add_(1.0)
        ckpt.save(step)
    ckpt.close()
    return model


def test_ls_shows_each_checkpoints_own_and_shared_bytes(tmp_path: Path) -> None:
    incremental_run(tmp_path)
    result = cli("ls", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    backbone = 128 * 128 * 4 + 128 * 4
    assert all(row["shared_bytes"] >= backbone for row in rows)  # the frozen layer, used by all three
    assert all(row["own_bytes"] < backbone for row in rows)  # the head (and the manifest) of each
    assert all(row["bytes"] == row["own_bytes"] + row["shared_bytes"] for row in rows)
    table = cli("ls", tmp_path)
    assert table.exit_code == 0 and "own" in table.output and "shared" in table.output


def test_verify_names_every_checkpoint_using_a_damaged_shared_pack(tmp_path: Path) -> None:
    incremental_run(tmp_path)
    storage = LocalStorage(tmp_path)
    shared = read_manifest(storage, "step-0000000000")[n.M_FILES][0]
    path = tmp_path / shared
    raw = bytearray(path.read_bytes())
    raw[8 + int.from_bytes(raw[:8], "little")] ^= 0xFF  # the first entry: the frozen weight, by element size
    path.write_bytes(bytes(raw))
    result = cli("verify", tmp_path)
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert f"shared pack {shared} is damaged: used by 3 checkpoint(s): step-0000000000, step-0000000001, " \
           "step-0000000002" in text, result.output


def test_prune_reclaims_the_packs_only_deleted_checkpoints_used(tmp_path: Path) -> None:
    incremental_run(tmp_path, saves=4)
    before = ContentStore(LocalStorage(tmp_path)).packs()
    result = cli("prune", tmp_path, "--keep-last", "1")
    assert result.exit_code == 0, result.output
    store = ContentStore(LocalStorage(tmp_path))
    after = store.packs()
    assert len(after) < len(before)
    assert set(after) == set().union(*store.referenced().values())
    assert cli("verify", tmp_path).exit_code == 0


def test_export_of_an_incremental_checkpoint_is_stand_alone(tmp_path: Path) -> None:
    model = incremental_run(tmp_path / "run")
    out = tmp_path / "weights.safetensors"
    result = cli("export", tmp_path / "run" / "step-0000000002", "--to", out)
    assert result.exit_code == 0, result.output
    shutil.rmtree(tmp_path / "run")  # the content store is gone: the export does not need it
    weights = load_file(str(out))
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
