"""Damaged side files and damaged records: each is skipped (or listed as damaged), never an exception.

A checksum-valid manifest whose fields the run cannot use, a metrics history or an alias
file of hostile bytes, a checkpoint deleted while it is read: saving, restoring, ``ls``,
``verify`` and ``plot`` go on with everything else.
"""

from __future__ import annotations

import json
import shutil
import time
import types
import zlib

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import savegame
from savegame.cli import main
from savegame.cli import runs as cli_runs
from savegame.cli.plot import read_history
from savegame.format import manifest
from savegame.format import names as n
from savegame.run import history

DEEP = b"[" * 100_000
BIG = "1" + "0" * 399  # a 400-digit int: JSON reads it, a float cannot hold it


def cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def make(run, **kwargs):
    model = torch.nn.Linear(2, 2)
    return model, savegame.Checkpointer(run, {"model": model}, async_save=False, **kwargs)


def filled(run, steps=(1, 2, 3), **kwargs):
    model, ckpt = make(run, best="loss", **kwargs)
    for step in steps:
        with torch.no_grad():
            model.weight.fill_(float(step))
        ckpt.save(step, metrics={"loss": 1.0 / step})
    ckpt.close()


def rewrite_manifest(path, edit) -> None:
    """Change fields of a manifest and re-seal it: its checksum is valid, its content is not."""
    raw = path.read_bytes()
    body = json.loads(raw[:raw.rfind(b',"' + n.M_CHECKSUM.encode() + b'":')] + b"}")
    edit(body)
    path.write_bytes(manifest.dumps(body))


BAD_FIELDS = [
    ("time", '"abc"'), ("time", "[1, 2]"), ("time", BIG), ("time", "1e999"), ("epoch", '"x"'), ("epoch", "1.5"),
    ("pinned", "1"), ("seq", "-1"), ("seq", '"7"'), ("metrics", '{"loss": "x"}'), ("metrics", '{"loss": ' + BIG + "}"),
    ("metrics", '{"loss": [0.5]}'),
]


def damage_field(run, name: str, field: str, text: str) -> None:
    path = run / name / n.MANIFEST
    raw = path.read_bytes()
    body = json.loads(raw[:raw.rfind(b',"' + n.M_CHECKSUM.encode() + b'":')] + b"}")
    body[field] = "@@RAW@@"
    dumped = json.dumps(body, separators=(",", ":")).replace('"@@RAW@@"', text).encode()
    path.write_bytes(dumped[:-1] + b',"' + n.M_CHECKSUM.encode() + b'":' + str(zlib.crc32(dumped[:-1])).encode() + b"}")
    try:  # checksum-valid: what refuses it is a check of its content, in the manifest reader or the run directory
        manifest.loads(path.read_bytes(), str(path))
    except savegame.errors.CorruptCheckpointError as exc:
        assert "checksum" not in str(exc), exc


@pytest.mark.parametrize(("field", "text"), BAD_FIELDS)
def test_a_bad_field_in_the_oldest_manifest_makes_it_damaged_not_an_error(tmp_path, field, text):
    filled(tmp_path)
    damage_field(tmp_path, "step-0000000001", field, text)
    model, ckpt = make(tmp_path, best="loss", keep_last=1)
    info = ckpt.restore()
    assert info is not None and info.step == 3 and model.weight.eq(3.0).all()
    assert ckpt.restore(2).step == 2 and ckpt.restore("best").step == 3
    ckpt.save(4, metrics={"loss": 0.1})  # retention runs over the damaged one: it is never deleted
    ckpt.close()
    rows = json.loads(cli("ls", tmp_path, "--json").output)
    assert [(r["step"], r["damaged"]) for r in rows] == [(1, True), (3, False), (4, False)]
    assert field in rows[0]["problems"][0]
    with pytest.raises(savegame.errors.CorruptCheckpointError, match="damaged"):
        make(tmp_path)[1].restore(1)


def test_a_malformed_stored_best_state_makes_the_checkpoint_damaged(tmp_path):
    filled(tmp_path)

    def edit(body):
        body[n.M_TREE][n.TREE_RUN]["best"] = {"loss": {"mode": "sideways", "entries": []}}
    rewrite_manifest(tmp_path / "step-0000000003" / n.MANIFEST, edit)
    _, ckpt = make(tmp_path, best="loss")
    assert ckpt.restore().step == 2
    ckpt.close()


def test_a_clock_that_steps_back_between_two_saves_of_a_step_does_not_bring_back_the_older(tmp_path, monkeypatch):
    clock = iter([2000.0, 1000.0])
    monkeypatch.setattr("savegame.checkpointer.time", types.SimpleNamespace(time=lambda: next(clock), monotonic=time.monotonic))
    model, ckpt = make(tmp_path)
    for value in (1.0, 2.0):
        with torch.no_grad():
            model.weight.fill_(value)
        ckpt.save(5)
    ckpt.close()
    monkeypatch.undo()
    model, ckpt = make(tmp_path)
    assert ckpt.restore().step == 5
    assert model.weight.eq(2.0).all()
    ckpt.close()
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000000005.1"]  # the older save was replaced


def test_a_damaged_history_line_never_stops_a_save_after_restoring_an_older_step(tmp_path):
    filled(tmp_path, steps=(1, 2, 3, 4))
    with open(tmp_path / n.HISTORY_FILE, "ab") as f:
        f.write(DEEP + b"\n")
    _, ckpt = make(tmp_path, best="loss")
    assert ckpt.restore(2).step == 2
    ckpt.save(3, metrics={"loss": 0.9})  # moves steps 3, 4 (and their history lines) aside
    ckpt.save(4, metrics={"loss": 0.8})
    ckpt.close()
    records = history.History(savegame.storage.LocalStorage(str(tmp_path))).records()
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert DEEP in (tmp_path / n.HISTORY_FILE).read_bytes()  # nothing is thrown away


HOSTILE_LINES = [b'{"step": 2, "metrics": {"loss": 0.5}}\xff', DEEP, b'{"step": 1e999, "metrics": {"loss": 0.5}}',
                 b'{"step": 3, "metrics": {"loss": ' + BIG.encode() + b"}}", b'{"step": 4, "metrics": [1]}',
                 b'{"step": 5, "time": "x", "metrics": {}}', b'{"step": true, "metrics": {}}', b"[1, 2]"]


def test_plot_skips_every_unreadable_history_line(tmp_path):
    good = [b'{"step": 1, "epoch": null, "time": 1.0, "metrics": {"loss": 0.5, "acc": "nan"}}',
            b'{"step": 6, "epoch": 2, "time": 2.0, "metrics": {"loss": 0.25}}']
    (tmp_path / n.HISTORY_FILE).write_bytes(b"\n".join([good[0], *HOSTILE_LINES, good[1]]) + b"\n")
    metrics, skipped = read_history(str(tmp_path))
    assert skipped == len(HOSTILE_LINES)
    assert metrics["loss"] == {1: 0.5, 6: 0.25} and list(metrics["acc"]) == [1]
    result = cli("plot", tmp_path, "--to", tmp_path / "out.png")
    assert result.exit_code == 0, result.output
    assert f"skipped {len(HOSTILE_LINES)} unreadable line(s)" in result.output
    assert (tmp_path / "out.png").stat().st_size > 0


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.sampled_from(HOSTILE_LINES),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                              lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=7), kids,
                                                                                          max_size=4),
                              max_leaves=12).map(lambda v: json.dumps(v).encode())))
def test_a_history_line_is_a_clean_record_or_none(raw):
    record = history.parse(raw)
    if record is not None:
        assert type(record["step"]) is int and (record["epoch"] is None or type(record["epoch"]) is int)
        assert all(isinstance(k, str) and type(v) is float for k, v in record["metrics"].items())


def test_ls_and_prune_read_around_a_damaged_alias_file(tmp_path):
    filled(tmp_path)
    (tmp_path / "best.alias.json").write_bytes(DEEP)
    (tmp_path / "latest.alias.json").write_bytes(b"\xff\xfe")
    result = cli("ls", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    aliases = {r["step"]: r["aliases"] for r in json.loads(result.output)}
    assert aliases[3] == ["best", "best:loss", "latest"]  # derived from the manifests
    assert cli("prune", tmp_path, "--keep-last", "1").exit_code == 0
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000000003"]


def test_a_checkpoint_deleted_while_ls_or_verify_reads_it_is_gone_not_damaged(tmp_path, monkeypatch):
    filled(tmp_path)
    victim = "step-0000000002"
    for command, real in (("ls", cli_runs.reader.read_manifest), ("verify", cli_runs.reader.verify_checkpoint)):
        def vanishing(storage, name, *rest, _real=real):
            if name == victim and (tmp_path / victim).exists():
                shutil.copytree(tmp_path / victim, tmp_path / "saved-copy")
                shutil.rmtree(tmp_path / victim)  # a trainer's retention, right as this command reads it
            return _real(storage, name, *rest)
        target = "read_manifest" if command == "ls" else "verify_checkpoint"
        monkeypatch.setattr(cli_runs.reader, target, vanishing)
        result = cli(command, tmp_path, *(["--json"] if command == "ls" else []))
        monkeypatch.undo()
        assert result.exit_code == 0, (command, result.output)
        if command == "ls":
            assert [r["step"] for r in json.loads(result.output)] == [1, 3]
        else:
            assert "gone    step-0000000002" in result.output and "DAMAGED" not in result.output
        shutil.move(tmp_path / "saved-copy", tmp_path / victim)


def test_ls_verify_exits_1_when_a_checkpoint_is_damaged(tmp_path):
    filled(tmp_path)
    assert cli("ls", tmp_path, "--verify").exit_code == 0
    data = tmp_path / "step-0000000002" / "tensors-00000.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-3] ^= 0x10
    data.write_bytes(bytes(raw))
    result = cli("ls", tmp_path, "--verify")
    assert result.exit_code == 1 and "DAMAGED" in result.output
    assert cli("ls", tmp_path, "--verify", "--json").exit_code == 1
    assert cli("ls", tmp_path).exit_code == 0  # the quick listing reads no data: nothing found, nothing claimed


def test_a_checkpoint_written_into_the_run_later_is_newer_than_a_save_of_its_step(tmp_path):
    """An import (savegame import / offline.write_tree) records its commit sequence too."""
    from savegame.engine.offline import write_tree

    model, ckpt = make(tmp_path)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ckpt.save(5)
    ckpt.close()
    with torch.no_grad():
        model.weight.fill_(2.0)
    tree = dict(savegame.load(tmp_path / "step-0000000005"))
    tree["state"] = {"model": {k: v.clone() for k, v in model.state_dict().items()}}
    write_tree(tmp_path, tree, step=5)
    model, ckpt = make(tmp_path)
    assert ckpt.restore().step == 5 and model.weight.eq(2.0).all()
    ckpt.close()
    assert json.loads((tmp_path / "latest.alias.json").read_text())["target"] == "step-0000000005.1"
