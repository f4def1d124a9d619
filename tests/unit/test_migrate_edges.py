"""Import edge cases: the chosen step, generators savegame does not track, malformed and unreadable
inputs, Lightning 1.x callback keys, tied weights, history, and what the offline writer does with them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import savegame
from savegame.cli import main
from savegame.engine.offline import write_tree
from savegame.errors import ConfigurationError, CorruptCheckpointError, StorageError, UnsafeCheckpointError
from savegame.migrate import import_checkpoint
from tests.compat.make_foreign import ES_KEY, build, lit_objects, tiny


def save(obj: Any, path: Path) -> Path:
    torch.save(obj, path)
    return path


# --- the import's step ------------------------------------------------------------------

def test_chosen_step_moves_undated_best_and_early_stopping_only(tmp_path: Path) -> None:
    flat = build("001-flat-rng", tmp_path)
    moved = import_checkpoint(flat.source, step=900)
    assert moved.step == 900 and moved.epoch == 9
    assert moved.tree["run"]["best"]["val_loss"]["entries"] == [[0.25, 900]]
    assert (moved.tree["run"]["early_stopping"]["best_step"], moved.tree["run"]["early_stopping"]["last_step"]) == (
        900, 900)
    assert "step 9 (the file's) -> step 900 (chosen for the import)" in moved.mapped

    lit = build("lightning", tmp_path)
    dated = import_checkpoint(lit.source, step=5000)
    assert dated.tree["run"]["best"]["val_loss"]["entries"][0][1] == 300  # the file says when: kept
    assert dated.tree["run"]["early_stopping"]["best_step"] == 300


def test_history_placed_by_epoch_follows_the_chosen_step(tmp_path: Path) -> None:
    v1 = build("004-format-v1", tmp_path)
    own = import_checkpoint(v1.source, drop_unsafe=True)
    assert [(h["step"], h["epoch"]) for h in own.history] == [(411, 0), (823, 1), (1234, 2)]
    assert own.history[0]["metrics"] == {"train_loss": 0.9, "val_loss": 0.8}
    chosen = import_checkpoint(v1.source, drop_unsafe=True, step=300)
    assert [h["step"] for h in chosen.history] == [100, 200, 300]


def test_accelerate_step_is_counted_by_the_optimizer_or_the_scheduler(tmp_path: Path) -> None:
    acc = build("accelerate", tmp_path)  # AdamW stepped twice; the RNG file's "step" (42) counts accumulation
    counted = import_checkpoint(acc.source)
    assert counted.step == 2
    assert "optimizer.bin:state[*].step (the optimizer's step count) -> step" in counted.mapped
    assert any(line.startswith("random_states_0.pkl:step (42: ") for line in counted.left_out)

    plain_sgd = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)  # keeps no step count
    save(plain_sgd.state_dict(), acc.source / "optimizer.bin")
    save({**tiny()["scheduler"].state_dict(), "last_epoch": 7}, acc.source / "scheduler.bin")
    scheduled = import_checkpoint(acc.source)
    assert scheduled.step == 7 and "scheduler.bin:last_epoch (the scheduler's step count) -> step" in scheduled.mapped

    (acc.source / "scheduler.bin").unlink()
    uncounted = import_checkpoint(acc.source)
    assert uncounted.step == 0 and any("--step N" in note for note in uncounted.notes)


# --- generators savegame does not track --------------------------------------------------

def test_numpy_generator_state_is_left_out_with_the_reason(tmp_path: Path) -> None:
    objs = tiny()
    generator = np.random.default_rng(0)
    ckpt = {"model": objs["model"].state_dict(), "epoch": 2, "np_rng_state": generator.bit_generator.state,
            "py_rng_state": list(__import__("random").getstate())}
    result = import_checkpoint(save(ckpt, tmp_path / "c.pth"))
    assert "numpy" not in result.tree["rng"] and "python" in result.tree["rng"]
    [line] = [line for line in result.left_out if line.startswith("np_rng_state")]
    assert "PCG64" in line and "default_rng" in line


# --- malformed and unreadable inputs ---------------------------------------------------------

def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("file", ["trainer_state.json", "model.safetensors.index.json"])
def test_deeply_nested_json_is_a_corrupt_checkpoint(tmp_path: Path, file: str) -> None:
    hf = build("hf-trainer", tmp_path)
    if file.endswith("index.json"):
        (hf.source / "model.safetensors").unlink()
    (hf.source / file).write_text('{"weight_map": ' + deep_json(200_000) + "}" if "index" in file
                                  else deep_json(200_000))
    with pytest.raises(CorruptCheckpointError, match="nests its JSON too deeply"):
        import_checkpoint(hf.source)


def test_unreadable_directory_is_a_storage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hf = build("accelerate", tmp_path)

    def refuse(self: Path) -> Any:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", refuse)
    with pytest.raises(StorageError, match="cannot list .*Permission denied"):
        import_checkpoint(hf.source)


def test_unreadable_file_is_a_storage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hf = build("hf-trainer", tmp_path)
    real = Path.read_text

    def refuse(self: Path, *args: Any, **kwargs: Any) -> str:
        if self.name == "trainer_state.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", refuse)
    with pytest.raises(StorageError, match="trainer_state.json"):
        import_checkpoint(hf.source)


def test_model_state_with_non_tensor_values_is_refused(tmp_path: Path) -> None:
    weights = tiny()["model"].state_dict()
    bad = {"model": {**weights, "fc.bias": "not a tensor"}, "epoch": 1}
    with pytest.raises(CorruptCheckpointError, match=r"model is not a model state dict.*'fc\.bias' holds a str"):
        import_checkpoint(save(bad, tmp_path / "bad.pth"))
    extra = {"model": {**weights, "fc._extra_state": {"scale": 2.0}}, "epoch": 1}  # get_extra_state() is any value
    assert import_checkpoint(save(extra, tmp_path / "ok.pth")).tree["state"]["model"]["fc._extra_state"] == {
        "scale": 2.0}


# --- torch.save(model): a whole module ---------------------------------------------------------------

def test_whole_module_imports_its_state_dict_with_trust_only(tmp_path: Path) -> None:
    model = tiny()["model"]
    whole = save(model, tmp_path / "model.pt")
    imports_with_trust = r"one .*Tiny object\. .*trust=True .* imports its state_dict"
    with pytest.raises(UnsafeCheckpointError, match=imports_with_trust) as refused:
        import_checkpoint(whole)
    assert "drop_unsafe" not in str(refused.value).split("The whole file")[1]  # dropping it leaves nothing
    trusted = import_checkpoint(whole, trust=True)
    assert trusted.layout == "state-dict" and trusted.mapped == ["(the whole file: a Tiny).state_dict() -> state.model"]
    assert trusted.tree["state"]["model"].keys() == model.state_dict().keys()
    assert all(torch.equal(trusted.tree["state"]["model"][k], v) for k, v in model.state_dict().items())

    in_a_dict = save({"model": model, "epoch": 3, "step": 30}, tmp_path / "dict.pt")
    result = import_checkpoint(in_a_dict, trust=True)
    assert result.step == 30 and "model -> state.model" in result.mapped
    assert all(torch.equal(result.tree["state"]["model"][k], v) for k, v in model.state_dict().items())


# --- Lightning 1.x: callbacks keyed by their class ------------------------------------------------

class ModelCheckpoint:  # stands for pytorch_lightning.callbacks.ModelCheckpoint (a refused global)
    pass


class EarlyStopping:  # stands for pytorch_lightning.callbacks.EarlyStopping
    pass


def test_lightning_1x_class_keyed_callbacks(tmp_path: Path) -> None:
    objs = lit_objects(0)
    ckpt = {"epoch": 3, "global_step": 400, "pytorch-lightning_version": "1.4.9",
            "state_dict": objs["model"].state_dict(), "optimizer_states": [objs["optimizer"].state_dict()],
            "callbacks": {ModelCheckpoint: {"monitor": "val_acc", "best_model_score": torch.tensor(0.9),
                                            "best_model_path": "/ck/epoch=2-step=300.ckpt"},
                          EarlyStopping: {"wait_count": 2, "best_score": torch.tensor(0.9), "patience": 5}}}
    path = save(ckpt, tmp_path / "old.ckpt")
    with pytest.raises(UnsafeCheckpointError, match=r"ModelCheckpoint at \['callbacks'\].*\(key\).*--drop-unsafe"):
        import_checkpoint(path)
    result = import_checkpoint(path, drop_unsafe=True)
    score = torch.tensor(0.9).item()
    assert result.tree["run"]["best"] == {"val_acc": {"mode": "min", "entries": [[score, 300]]}}
    assert any("mode not recorded; Lightning's default min assumed" in line for line in result.mapped)
    assert "callbacks['EarlyStopping'] (no monitor or wait count)" in result.left_out  # 1.x does not save it
    assert result.tree["state"]["model"].keys() == objs["model"].state_dict().keys()


def test_lightning_2x_early_stopping_monitor_from_the_key(tmp_path: Path) -> None:
    lit = build("lightning", tmp_path)
    result = import_checkpoint(lit.source)
    assert result.tree["run"]["early_stopping"]["metric"] == "val_loss"
    assert f"callbacks[{ES_KEY!r}] -> run.early_stopping" in result.mapped


# --- tied weights ----------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [True, False])
def test_tied_weights_note(tmp_path: Path, tied: bool) -> None:
    hf = build("hf-trainer-tied" if tied else "hf-trainer", tmp_path)
    notes = import_checkpoint(hf.source).notes
    assert any("tied" in note and "lm_head.weight" in note for note in notes) == tied


def test_accelerate_safetensors_model_gets_the_tied_weights_note(tmp_path: Path) -> None:
    acc = build("accelerate", tmp_path)
    assert any("model.safetensors may hold tied weights" in note for note in import_checkpoint(acc.source).notes)


# --- what the offline writer does with an import -------------------------------------------------------

def tree_of(step: int) -> dict[str, Any]:
    return {"state": {"model": {"w": torch.full((3,), float(step))}}, "rng": {}, "run": {"best": {},
                                                                                       "early_stopping": None}}


def latest(run: Path) -> str:
    return json.loads((run / "latest.alias.json").read_text())["target"]


def test_latest_moves_only_to_the_newest_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_tree(run, tree_of(10), step=10)
    assert latest(run) == "step-0000000010"
    write_tree(run, tree_of(5), step=5)  # an older import: latest stays
    assert latest(run) == "step-0000000010"
    write_tree(run, tree_of(20), step=20)
    assert latest(run) == "step-0000000020"
    write_tree(run, tree_of(20), step=20)  # the same step again: the later save is the newest
    assert latest(run) == "step-0000000020.1"


def test_history_lines_then_the_checkpoint_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "metrics": {"loss": 1.0}}\n{"step": 2, "met')  # torn by a crash
    history = [{"step": 3, "epoch": 0, "metrics": {"loss": 0.5, "acc": float("nan")}}]
    write_tree(run, tree_of(4), step=4, epoch=1, metrics={"loss": 0.25}, history=history)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert lines[1] == '{"step": 2, "met'  # left in place, ended, so the next lines stay whole
    assert json.loads(lines[2]) == {"step": 3, "epoch": 0, "time": None, "metrics": {"loss": 0.5, "acc": "nan"}}
    last = json.loads(lines[3])
    assert (last["step"], last["epoch"], last["metrics"]) == (4, 1, {"loss": 0.25}) and last["time"] > 0


def test_plot_works_on_a_migrated_run(tmp_path: Path) -> None:
    v1 = build("004-format-v1", tmp_path / "foreign")
    result = CliRunner().invoke(main, ["migrate", str(v1.source), "--to", str(tmp_path / "run"), "--drop-unsafe"])
    assert result.exit_code == 0, result.output
    plotted = CliRunner().invoke(main, ["plot", str(tmp_path / "run"), "--to", str(tmp_path / "m.png")])
    assert plotted.exit_code == 0, plotted.output
    assert "train_loss, val_loss" in plotted.stdout and "(6 points)" in plotted.stdout
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- progress -------------------------------------------------------------------------------------------

def test_import_reports_the_bytes_it_reads(tmp_path: Path) -> None:
    flat = build("001-flat-rng", tmp_path)
    seen: list[int] = []
    import_checkpoint(flat.source, progress=seen.append)
    assert len(seen) > 1 and sum(seen) >= os.path.getsize(flat.source)
    acc = build("accelerate", tmp_path)
    seen.clear()
    import_checkpoint(acc.source, progress=seen.append)
    read = [p for p in acc.source.iterdir() if p.name not in ("sampler.bin",)]
    assert sum(seen) >= sum(p.stat().st_size for p in read)


def test_write_tree_reports_the_bytes_it_writes(tmp_path: Path) -> None:
    seen: list[int] = []
    tree = {"state": {"model": {"a": torch.ones(1000), "b": torch.zeros(500, dtype=torch.float64)}}, "rng": {},
            "run": {"best": {}, "early_stopping": None}}
    path = write_tree(tmp_path / "run", tree, step=1, progress=seen.append)
    assert sum(seen) >= 1000 * 4 + 500 * 8
    assert torch.equal(savegame.load(path)["state"]["model"]["a"], torch.ones(1000))


def test_safetensors_model_file_imports(tmp_path: Path) -> None:
    weights = tiny()["model"].state_dict()
    save_file(weights, str(tmp_path / "w.safetensors"))
    result = import_checkpoint(tmp_path / "w.safetensors")
    assert all(torch.equal(result.tree["state"]["model"][k], v) for k, v in weights.items())


def test_migrate_step_option_reaches_the_import(tmp_path: Path) -> None:
    flat = build("001-flat-rng", tmp_path / "foreign")
    done = CliRunner().invoke(main, ["migrate", str(flat.source), "--to", str(tmp_path / "run"), "--step", "900"])
    assert done.exit_code == 0, done.output
    loaded = savegame.load(tmp_path / "run")
    assert loaded["step"] == 900 and loaded["epoch"] == 9
    assert loaded["run"]["best"] == {"val_loss": {"mode": "min", "entries": [[0.25, 900]]},
                                     "pck": {"mode": "max", "entries": [[0.8, 900]]}}
    assert loaded["run"]["early_stopping"]["best_step"] == 900


@pytest.mark.parametrize("columns", [80, 120])
def test_trust_warning_is_shown_whole_at_the_terminal_width(tmp_path: Path, columns: int) -> None:
    from savegame.cli.migrate import TRUST_WARNING

    flat = build("001-flat-rng", tmp_path)
    done = CliRunner().invoke(main, ["migrate", str(flat.source), "--to", str(tmp_path / "run"), "--trust"],
                              env={"COLUMNS": str(columns)})
    assert done.exit_code == 0, done.output
    lines = done.stderr.splitlines()
    panel = lines[:next(i for i, line in enumerate(lines) if line.startswith("╰")) + 1]
    assert panel[0].startswith("╭") and "WARNING" in panel[0] and all(len(line) <= columns for line in panel)
    shown = " ".join(line.strip("│ ") for line in panel[1:-1])
    assert " ".join(shown.split()) == TRUST_WARNING  # every sentence, none cut at the border


# --- config snapshots into extra; renamed states ---------------------------------------------------------

def test_config_snapshots_go_into_extra_when_plain_json(tmp_path: Path) -> None:
    golden = Path(__file__).parents[1] / "compat" / "data" / "foreign"
    hf = import_checkpoint(golden / "hf-trainer" / "checkpoint-6")
    assert hf.extra == {"config.json": json.loads((golden / "hf-trainer" / "checkpoint-6" / "config.json").read_text())}
    assert "config.json -> extra['config.json']" in hf.mapped
    v1 = import_checkpoint(golden / "004-format-v1" / "checkpoint.pt", drop_unsafe=True)
    assert v1.extra == {"config_snapshot": {"optimizer": {"lr": 0.01}}}

    done = CliRunner().invoke(main, ["migrate", str(golden / "lightning" / "last.ckpt"), "--to", str(tmp_path / "run")])
    assert done.exit_code == 0, done.output
    assert savegame.load(tmp_path / "run")["extra"] == {"hyper_parameters": {"lr": 0.01, "hidden": 4}}

    objs = tiny()
    odd = save({"format_version": 1, "model_state_dict": objs["model"].state_dict(), "optimizer_state_dicts": [],
                "config_snapshot": {"lr": 0.01, "warmup": torch.ones(2)}}, tmp_path / "odd.pt")
    result = import_checkpoint(odd)
    assert result.extra == {}
    assert "config_snapshot (a config snapshot, but config_snapshot.warmup is a Tensor: extra holds plain JSON " \
           "values only)" in result.left_out


def test_rename_gives_imported_states_other_names(tmp_path: Path) -> None:
    v1 = build("004-format-v1", tmp_path)
    result = import_checkpoint(v1.source, drop_unsafe=True, rename={"optimizer_1": "disc_optimizer"})
    assert list(result.tree["state"]) == ["model", "optimizer", "disc_optimizer", "scheduler", "scheduler_1", "scaler"]
    assert "optimizer_state_dicts[1] -> state.disc_optimizer (renamed from state.optimizer_1)" in result.mapped
    with pytest.raises(ConfigurationError, match=r"cannot rename 'optimizer_2': the import has no such state .*"
                                                 r"optimizer_1"):
        import_checkpoint(v1.source, drop_unsafe=True, rename={"optimizer_2": "x"})
    with pytest.raises(ConfigurationError, match="two imported states the name 'optimizer'"):
        import_checkpoint(v1.source, drop_unsafe=True, rename={"optimizer_1": "optimizer"})

    run = tmp_path / "run"
    done = CliRunner().invoke(main, ["migrate", str(v1.source), "--to", str(run), "--drop-unsafe",
                                     "--rename", "optimizer_1=disc_optimizer", "--rename", "scheduler_1=disc_sched"])
    assert done.exit_code == 0, done.output
    assert {"disc_optimizer", "disc_sched"} <= set(savegame.load(run)["state"])
    bad = CliRunner().invoke(main, ["migrate", str(v1.source), "--to", str(run), "--rename", "optimizer_1"])
    assert bad.exit_code == 2 and "is not OLD=NEW" in bad.output
