"""The ``savegame`` command, in-process through click's CliRunner (exit codes, output, files)."""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import savegame
from savegame.cli import main
from savegame.engine.offline import write_tree
from savegame.format.names import FORMAT_VERSION
from savegame.run.directory import RunDir, RunLock
from savegame.storage.local import LocalStorage
from tests.damage import flip_data_byte

LOSSES = {10: 0.5, 20: 0.2, 30: 0.4, 40: 0.3}  # the best val_loss is at step 20


class Position:
    """A data-loader-like state: where the data stream is."""

    def __init__(self) -> None:
        self.epoch, self.position = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": 7, "order": [3, 1, 2]}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


def make_run(path) -> str:
    """Four checkpoints; model weights grow by 0.1 per save; best val_loss at step 20."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()  # momentum buffers in the optimizer state
    loader = Position()
    ckpt = savegame.Checkpointer(path, state={"model": model, "optimizer": opt, "loader": loader},
                                 best={"val_loss": "min"}, async_save=False)
    for epoch, (step, loss) in enumerate(LOSSES.items()):
        with torch.no_grad():
            model[0].weight.add_(0.1)
        loader.epoch, loader.position = epoch, step * 3
        ckpt.save(step, epoch=epoch, metrics={"val_loss": loss}, extra={"note": "test"})
    ckpt.close()
    return str(path)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> str:
    return make_run(tmp_path_factory.mktemp("cli") / "run")


@pytest.fixture
def run(base_run, tmp_path) -> str:
    """A private copy of the run, for tests that change it."""
    return shutil.copytree(base_run, tmp_path / "run")


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def name(step: int) -> str:
    return f"step-{step:010d}"


def flip_first_data_byte(ckpt_dir: str) -> None:
    flip_data_byte(ckpt_dir, 0)


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("savegame: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# -- ls ------------------------------------------------------------------------------------

def test_ls_table_and_json(base_run):
    table = cli("ls", base_run)
    assert table.exit_code == 0, table.output
    for step in LOSSES:
        assert name(step) in table.stdout
    assert "best:val_loss" in table.stdout and "val_loss=0.2" in table.stdout and "DAMAGED" not in table.stdout

    listed = json.loads(cli("ls", "--json", base_run).stdout)
    assert [row["step"] for row in listed] == list(LOSSES)
    assert [row["epoch"] for row in listed] == [0, 1, 2, 3]
    assert [row["metrics"] for row in listed] == [{"val_loss": v} for v in LOSSES.values()]
    for row in listed:
        assert os.path.isfile(os.path.join(row["path"], "manifest.json"))
        assert row["bytes"] > 0 and row["damaged"] is False
    assert set(listed[1]["aliases"]) == {"best", "best:val_loss"}
    assert listed[-1]["aliases"] == ["latest"]


def test_ls_marks_damaged_checkpoints_instead_of_hiding_them(run):
    tensors = os.path.join(run, name(30), "tensors-00000.safetensors")
    os.truncate(tensors, os.path.getsize(tensors) - 16)
    os.remove(os.path.join(run, name(10), "manifest.json"))
    table = cli("ls", run)
    assert table.exit_code == 0
    assert table.stdout.count("DAMAGED") == 2 and name(30) in table.stdout and name(10) in table.stdout
    listed = json.loads(cli("ls", "--json", run).stdout)
    assert [(row["step"], row["damaged"]) for row in listed] == [(10, True), (20, False), (30, True), (40, False)]
    assert listed[0]["problems"] and "manifest" in listed[0]["problems"][0]


def test_ls_verify_catches_a_flipped_data_byte(run):
    flip_first_data_byte(os.path.join(run, name(20)))
    assert json.loads(cli("ls", "--json", run).stdout)[1]["damaged"] is False  # headers only: not seen
    listed = json.loads(cli("ls", "--json", "--verify", run).stdout)
    assert [row["damaged"] for row in listed] == [False, True, False, False]


# -- verify --------------------------------------------------------------------------------

def test_verify_intact_flipped_and_truncated(run):
    ok = cli("verify", run)
    assert ok.exit_code == 0 and "all 4 checkpoint(s) intact" in ok.stdout
    assert cli("verify", os.path.join(run, name(20))).exit_code == 0

    flip_first_data_byte(os.path.join(run, name(20)))
    bad = cli("verify", run)
    assert bad.exit_code == 1
    damaged = [line for line in bad.stdout.splitlines() if line.startswith("DAMAGED")]
    assert len(damaged) == 1 and name(20) in damaged[0] and "checksum" in damaged[0]
    single = cli("verify", os.path.join(run, name(20)))
    assert single.exit_code == 1 and name(20) in single.stdout
    assert cli("verify", os.path.join(run, name(30))).exit_code == 0

    tensors = os.path.join(run, name(40), "tensors-00000.safetensors")
    os.truncate(tensors, os.path.getsize(tensors) // 2)
    truncated = cli("verify", run)
    assert truncated.exit_code == 1 and "2 of 4 checkpoint(s) damaged" in truncated.stdout
    assert any(name(40) in line for line in truncated.stdout.splitlines() if line.startswith("DAMAGED"))


# -- inspect -------------------------------------------------------------------------------

def test_inspect_json_fields(base_run):
    report = json.loads(cli("inspect", "--json", base_run).stdout)  # a run directory: its newest
    assert report["name"] == name(40)
    assert report["versions"] == {"savegame": savegame.__version__, "torch": torch.__version__,
                                  "format": FORMAT_VERSION}
    assert (report["step"], report["epoch"], report["metrics"]) == (40, 3, {"val_loss": 0.3})
    assert report["extra"] == {"note": "test"} and report["time"] > 0
    assert report["states"]["model"] == {"tensors": 4, "bytes": (32 + 8 + 16 + 2) * 4,
                                         "type": "torch.nn.modules.container.Sequential"}
    assert report["states"]["optimizer"]["tensors"] == 4  # SGD momentum buffers
    assert report["states"]["optimizer"]["type"] == "torch.optim.sgd.SGD"
    first = report["tensors"]["model"][0]
    assert first == {"key": "0.weight", "dtype": "float32", "shape": [8, 4], "bytes": 128}
    cuda = len(savegame.load(base_run)["rng"]["cuda"])  # saved only when CUDA was initialised
    assert report["rng"] == {"python": True, "numpy": True, "torch": True, "cuda": cuda}
    assert report["data"] == {"loader": {"epoch": 3, "position": 120, "seed": 7}}
    assert report["run"]["best"]["val_loss"]["entries"][0] == [0.2, 20]
    assert report["bytes"] > 0 and sum(f["bytes"] for f in report["files"]) > report["bytes"]

    one = json.loads(cli("inspect", "--json", "--tree", os.path.join(base_run, name(10))).stdout)
    assert one["step"] == 10 and one["tree"]["state"]["model"]["0.bias"] == {"dtype": "float32", "shape": [8]}


def test_inspect_table_and_tree(base_run):
    table = cli("inspect", base_run)
    assert table.exit_code == 0, table.output
    for text in ("0.weight", "float32", "[8, 4]", "savegame " + savegame.__version__, "best val_loss (min)",
                 "torch.optim.sgd.SGD",
                 "data position (loader): epoch=3, position=120"):
        assert text in table.stdout, text
    tree = cli("inspect", "--tree", base_run)
    assert tree.exit_code == 0 and "momentum_buffer: float32 [8, 4]" in tree.stdout and "rng" in tree.stdout


# -- diff ----------------------------------------------------------------------------------

def test_diff_finds_changed_tensors_and_values(base_run):
    a, b = os.path.join(base_run, name(10)), os.path.join(base_run, name(20))
    found = json.loads(cli("diff", "--json", a, b).stdout)
    changed = {c["key"]: c for c in found["changed"]}
    assert found["same"] is False
    assert changed["state.model.0.weight"]["max_abs"] == pytest.approx(0.1, rel=1e-5)
    assert "state.model.0.bias" not in changed  # only the weight moved
    values = {v["key"]: (v["a"], v["b"]) for v in found["values"]}
    assert values["step"] == (10, 20) and values["metrics.val_loss"] == (0.5, 0.2)
    assert "time" not in values

    table = cli("diff", "--exit-code", a, b)
    assert table.exit_code == 1 and "state.model.0.weight" in table.stdout
    same = cli("diff", "--exit-code", a, a)
    assert same.exit_code == 0 and "identical" in same.stdout
    assert cli("diff", a, b).exit_code == 0  # without --exit-code, differences are not a failure


def test_diff_reports_added_and_removed(base_run, tmp_path):
    tree = savegame.load(os.path.join(base_run, name(40)))
    state = {k: dict(v) for k, v in tree["state"].items()}
    state["model"]["head.weight"] = torch.ones(2, 2)
    del state["model"]["1.bias"]
    other = write_tree(tmp_path / "other", {"state": state, "rng": tree["rng"], "run": tree["run"]}, step=40,
                       epoch=3, metrics={"val_loss": 0.3})
    found = json.loads(cli("diff", "--json", os.path.join(base_run, name(40)), other).stdout)
    assert [a["key"] for a in found["added"]] == ["state.model.head.weight"]
    assert [r["key"] for r in found["removed"]] == ["state.model.1.bias"]
    assert found["changed"] == [] and found["identical_tensors"] > 0


# -- export --------------------------------------------------------------------------------

def saved_model(run_dir: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in savegame.load(run_dir)["state"]["model"].items()}


def test_export_safetensors_exact_and_bf16(base_run, tmp_path):
    from safetensors.torch import load_file

    expected = saved_model(base_run)
    out = tmp_path / "model.safetensors"
    result = cli("export", base_run, "--to", out)
    assert result.exit_code == 0, result.output
    got = load_file(out)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)

    assert cli("export", base_run, "--to", out, "--dtype", "bf16").exit_code == 0  # replaces the file
    half = load_file(out)
    assert all(half[k].dtype == torch.bfloat16 and torch.equal(half[k], expected[k].bfloat16()) for k in expected)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary file left


def test_export_pt_loads_weights_only_and_keeps_ties(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(5, 3)
            self.head = torch.nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight
            self.register_buffer("count", torch.tensor(7))

    model = Tied()
    with savegame.Checkpointer(tmp_path / "run", state={"model": model}, async_save=False) as ckpt:
        ckpt.save(1)
    result = cli("export", tmp_path / "run", "--to", tmp_path / "w.pt")
    assert result.exit_code == 0 and "tied" in result.stdout
    got = torch.load(tmp_path / "w.pt", weights_only=True)
    expected = model.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert got["embed.weight"].data_ptr() == got["head.weight"].data_ptr()
    assert os.path.getsize(tmp_path / "w.pt") < 4096  # the tensors' own bytes, not the checkpoint's file buffer

    from safetensors.torch import load_file

    assert cli("export", tmp_path / "run", "--to", tmp_path / "w.safetensors").exit_code == 0
    assert torch.equal(load_file(tmp_path / "w.safetensors")["head.weight"], expected["head.weight"])


def test_export_npz_and_bf16_becomes_float32(base_run, tmp_path):
    expected = saved_model(base_run)
    assert cli("export", base_run, "--to", tmp_path / "w.npz").exit_code == 0
    with np.load(tmp_path / "w.npz") as got:
        assert sorted(got.files) == sorted(expected)
        assert all(np.array_equal(got[k], expected[k].numpy()) for k in expected)
    result = cli("export", base_run, "--to", tmp_path / "h.npz", "--dtype", "bf16")
    assert result.exit_code == 0 and "NumPy has no bfloat16" in result.stdout and "float32" in result.stdout
    with np.load(tmp_path / "h.npz") as got:
        assert got["0.weight"].dtype == np.float32
        assert np.array_equal(got["0.weight"], expected["0.weight"].bfloat16().float().numpy())


def test_export_refuses_bad_targets_and_states(base_run, tmp_path):
    assert_one_line_error(cli("export", base_run, "--to", tmp_path / "w.bin"), "unknown format '.bin'")
    assert_one_line_error(cli("export", base_run, "--to", tmp_path / "w.pt", "--state", "nope"),
                          "no such state", "model, optimizer, loader")
    assert_one_line_error(cli("export", base_run, "--to", tmp_path / "w.pt", "--state", "loader"),
                          "not model weights")
    assert_one_line_error(cli("export", base_run, "--to", tmp_path / "missing" / "w.pt"), "does not exist")
    assert list(tmp_path.iterdir()) == []


# -- prune ---------------------------------------------------------------------------------

def test_prune_dry_run_then_for_real_keeps_best(run):
    before = sorted(os.listdir(run))
    dry = cli("prune", run, "--keep-last", "1", "--dry-run")
    assert dry.exit_code == 0 and "would delete 2 checkpoint(s)" in dry.stdout
    assert sorted(os.listdir(run)) == before

    done = cli("prune", run, "--keep-last", "1")
    assert done.exit_code == 0 and "deleted 2 checkpoint(s)" in done.stdout
    assert RunDir(LocalStorage(run)).names() == [name(20), name(40)]
    assert not [n for n in os.listdir(run) if n.startswith(".trash-")]
    assert cli("verify", run).exit_code == 0


def test_prune_keeps_the_newest_intact_checkpoints(run):
    tensors = os.path.join(run, name(40), "tensors-00000.safetensors")
    os.truncate(tensors, os.path.getsize(tensors) - 8)  # the newest is damaged: it does not count as kept
    done = cli("prune", run, "--keep-last", "1")
    assert done.exit_code == 0, done.output
    assert RunDir(LocalStorage(run)).names() == [name(20), name(30), name(40)]  # best, newest intact, newest


@pytest.mark.parametrize("command", [("ls",), ("prune", "--keep-last", "1"), ("plot", "--to", "x.png")])
def test_run_dir_commands_given_a_checkpoint_directory_say_so_and_change_nothing(run, command):
    ckpt_dir = os.path.join(run, name(30))
    before = sorted(os.listdir(ckpt_dir))
    assert_one_line_error(cli(command[0], ckpt_dir, *command[1:]), "is a checkpoint directory", f"its run directory is {run}")
    assert sorted(os.listdir(ckpt_dir)) == before


def test_prune_of_a_directory_without_checkpoints_leaves_it_untouched(tmp_path):
    done = cli("prune", tmp_path, "--keep-last", "1")
    assert done.exit_code == 0 and "holds no checkpoint" in done.stdout
    assert os.listdir(tmp_path) == []  # not even a lock file


def test_prune_refuses_while_a_writer_holds_the_lock(run):
    lock = RunLock(run)
    lock.acquire()
    try:
        assert_one_line_error(cli("prune", run, "--keep-last", "1"), "locked")
        assert cli("prune", run, "--keep-last", "1", "--dry-run").exit_code == 0  # reading needs no lock
    finally:
        lock.release()
    assert len([n for n in os.listdir(run) if n.startswith("step-")]) == 4


# -- plot ----------------------------------------------------------------------------------

def test_plot_writes_a_readable_png(run, tmp_path):
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 50, "epoch": 4, "time": 0, "metrics": {"val_loss": "nan", "acc": 0.9}}) + "\n")
        f.write('{"step": 60, "metr')  # a line torn by a crash
    out = tmp_path / "metrics.png"
    result = cli("plot", run, "--to", out)
    assert result.exit_code == 0, result.output
    assert "val_loss, acc" in result.stdout and "skipped 1 unreadable line" in result.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600

    assert cli("plot", run, "--to", out, "--metric", "val_loss").exit_code == 0
    assert_one_line_error(cli("plot", run, "--to", out, "--metric", "nope"), "no metric 'nope'", "val_loss")


# -- migrate -------------------------------------------------------------------------------

def test_migrate_imports_a_foreign_checkpoint(tmp_path):
    model = torch.nn.Linear(3, 2)
    torch.save({"model": model.state_dict(), "epoch": 7, "best_val_loss": 0.25, "py_rng_state": random.getstate(),
                "args": {"lr": 0.1}}, tmp_path / "old.pth")
    result = cli("migrate", tmp_path / "old.pth", "--to", tmp_path / "run", "--step", "700")
    assert result.exit_code == 0, result.output
    assert "layout: dict-flat-rng" in result.stdout and "state.model" in result.stdout
    assert "args" in result.stdout and "left out" in result.stdout
    tree = savegame.load(tmp_path / "run")
    assert tree["step"] == 700 and tree["epoch"] == 7
    assert all(torch.equal(tree["state"]["model"][k], v) for k, v in model.state_dict().items())

    trusted = cli("migrate", tmp_path / "old.pth", "--to", tmp_path / "run2", "--trust")
    assert trusted.exit_code == 0 and "WARNING" in trusted.stderr and "IMPORTED" in trusted.stderr
    assert_one_line_error(cli("migrate", tmp_path / "run", "--to", tmp_path / "run3"))


# -- errors --------------------------------------------------------------------------------

def test_usage_errors_and_unreadable_input_exit_2_with_one_line(base_run, tmp_path):
    assert_one_line_error(cli("ls"), "Missing argument 'RUN_DIR'")
    assert_one_line_error(cli("ls", tmp_path / "nope"), "does not exist")
    assert_one_line_error(cli("frobnicate"), "No such command")
    assert_one_line_error(cli("prune", base_run, "--keep-last", "0"), "--keep-last")
    assert_one_line_error(cli("export", base_run, "--to", tmp_path / "w.pt", "--dtype", "int3"), "--dtype")
    (tmp_path / "notes.txt").write_text("hello")
    assert_one_line_error(cli("inspect", tmp_path / "notes.txt"), "not a savegame checkpoint")
    assert_one_line_error(cli("inspect", tmp_path), "no savegame checkpoint")
    assert_one_line_error(cli("verify", tmp_path), "no savegame checkpoint")
    assert_one_line_error(cli("plot", tmp_path, "--to", tmp_path / "p.png"), "metrics.jsonl")
    broken = shutil.copytree(os.path.join(base_run, name(10)), tmp_path / name(10))
    with open(os.path.join(broken, "manifest.json"), "r+b") as f:
        f.write(b"X")
    assert_one_line_error(cli("inspect", broken), name(10), "manifest")
    assert_one_line_error(cli("diff", broken, base_run), "manifest")
    assert_one_line_error(cli("export", broken, "--to", tmp_path / "w.pt"), "manifest")
