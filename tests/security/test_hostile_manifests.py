"""Manifests whose checksums are valid but whose content is hostile: one savegame error, never another.

A checkpoint that fails these checks is damaged: ``restore("latest")`` falls back past it (the
model keeps none of its bytes) and ``verify`` reports it. A state that is well-formed but does not
fit the objects (a str where a model has a tensor) is an IncompatibleStateError, raised before
anything loads.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import savegame
from savegame.engine.reader import verify_checkpoint
from savegame.errors import CorruptCheckpointError, IncompatibleStateError
from savegame.format import names as n
from savegame.storage.local import LocalStorage
from tests.damage import entry_at, rewrite_manifest, set_entry
from tests.security import _hostile as h


def extra(value):
    def mutate(doc):
        doc[n.M_EXTRA] = value
    return mutate


def tree(*path_and_value):
    *path, value = path_and_value

    def mutate(doc):
        node = doc[n.M_TREE]
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


def entry(column, value, *path):
    def mutate(doc):
        set_entry(doc, column, entry_at(doc, n.TREE_STATE, *path), value)
    return mutate


def huge_view(doc):
    doc[n.M_TENSORS][n.T_VIEWS][0].update(shape=[2**40, 2**40], stride=[0, 0])


# Each makes the checkpoint damaged: format-level problems, whatever it is restored into.
DAMAGED = {
    "complex of a 400-digit int": extra({"$complex": [10**400, 0]}),
    "device named ''": extra({"$device": ""}),
    "view [2**40, 2**40] stride [0, 0]": huge_view,
    "entry shape [0, 2**70]": entry(n.E_SHAPE, [0, 2**70], "arrays", "e"),
    "entry shape not its byte size": entry(n.E_SHAPE, [5], "arrays", "a"),
    "NumPy entry of bfloat16": entry(n.E_DTYPE, "bfloat16", "arrays", "a"),
    "NumPy entry of qint8": entry(n.E_DTYPE, "qint8", "arrays", "b"),
    "NumPy entry of bits8": entry(n.E_DTYPE, "bits8", "arrays", "b"),
    "tensor entry of quint8": entry(n.E_DTYPE, "quint8", "arrays", "u"),
    "rng.cuda = 5": tree(n.TREE_RNG, "cuda", 5),
    "Python RNG of 625 huge ints": tree(n.TREE_RNG, "python", "$tuple", 1, "$tuple", [10**30] * 625),
    "malformed NumPy RNG tuple": tree(n.TREE_RNG, "numpy", "$tuple", ["MT19937", 1, 2]),
    "NumPy RNG has_gauss a tensor": tree(n.TREE_RNG, "numpy", "$tuple", 3, {"$t": 0}),
    "torch RNG of 3 bytes": tree(n.TREE_RNG, "torch", {"$size": [3]}),
    "types = {optimizer: 5}": tree(n.TREE_TYPES, "optimizer", 5),
    "run state = 7": tree(n.TREE_RUN, 7),
    "metrics = {loss: 'x'}": lambda doc: doc.__setitem__(n.M_METRICS, {"loss": "x"}),
    "tensor file named tensors-1.safetensors": lambda doc: doc.__setitem__(n.M_FILES, ["tensors-1.safetensors"]),
    "entry starts = 5": lambda doc: doc[n.M_ENTRIES].__setitem__(n.E_START, 5),
    "run.best = [1]": tree(n.TREE_RUN, "best", [1]),
    "early-stopping best of 10**30": tree(n.TREE_RUN, "early_stopping", {"best": 10**30, "config": {}}),
}
# Well-formed checkpoints whose states do not fit the objects given.
MISFITS = {
    "state.model.weight = 'abc'": tree(n.TREE_STATE, "model", "weight", "abc"),
    "state.model = [1, 2]": tree(n.TREE_STATE, "model", [1, 2]),
    "state.optimizer = 'abc'": tree(n.TREE_STATE, "optimizer", "abc"),
    "state.optimizer.param_groups = 3": tree(n.TREE_STATE, "optimizer", "param_groups", 3),
    "optimizer parameter ids are lists": tree(n.TREE_STATE, "optimizer", "param_groups", 0, "params", [[0], [1]]),
}
# Well-formed: restore and load succeed.
FINE = {
    "an array is the model's weight": lambda doc: doc[n.M_TREE][n.TREE_STATE]["arrays"].__setitem__(
        "a", {"$nd": doc[n.M_TREE][n.TREE_STATE]["model"]["weight"]["$t"]}),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "run"
    return path, h.make_run(path)


def hostile_run(base, tmp_path, mutate):
    run = shutil.copytree(base[0], tmp_path / "run")
    rewrite_manifest(run / h.NEW, mutate)
    return run


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_hostile_content_is_a_damaged_checkpoint(base, tmp_path, case):
    run = hostile_run(base, tmp_path, DAMAGED[case])
    with pytest.raises(CorruptCheckpointError):
        savegame.load(run / h.NEW)
    assert verify_checkpoint(LocalStorage(str(run)), h.NEW)
    assert verify_checkpoint(LocalStorage(str(run)), h.OLD) == []
    for strict in (True, False):
        objs = h.objects()
        with torch.no_grad():
            objs["model"].weight.zero_()
        info = h.restore(run, objs, strict=strict)
        assert info.step == 1 and info.extra == {"note": "old"}  # fell back past the damaged one
        assert torch.equal(objs["model"].weight, base[1]["weight"])
    assert h.run_cli(["verify", str(run)]).exit_code == 1
    h.all_readers(run, tmp_path / "out")


@pytest.mark.parametrize("case", sorted(MISFITS))
def test_states_that_do_not_fit_are_refused_before_anything_loads(base, tmp_path, case):
    run = hostile_run(base, tmp_path, MISFITS[case])
    savegame.load(run / h.NEW)  # the checkpoint itself is fine
    objs = h.objects()
    before = {k: v.clone() for k, v in objs["model"].state_dict().items()}
    with pytest.raises(IncompatibleStateError):
        h.restore(run, objs)
    assert all(torch.equal(v, before[k]) for k, v in objs["model"].state_dict().items())
    info = h.restore(run, h.objects(), strict=False)
    assert info.step == 2 and any(info.reports.values())
    h.all_readers(run, tmp_path / "out")


def test_bits_dtypes_are_stored_and_compared_without_error(base, tmp_path):
    run = hostile_run(base, tmp_path, entry(n.E_DTYPE, "bits8", "arrays", "u"))
    assert savegame.load(run / h.NEW)["state"]["arrays"]["u"].dtype == torch.bits8
    assert h.run_cli(["diff", str(run / h.OLD), str(run / h.NEW)]).exit_code == 0
    h.all_readers(run, tmp_path / "out")


def test_a_tensor_file_past_five_digits_is_read(base, tmp_path):
    """Checkpoints of 100,000 files and more name them with six digits or more; readers accept them."""
    run = shutil.copytree(base[0], tmp_path / "run")
    files = json.loads((run / h.NEW / n.MANIFEST).read_text())[n.M_FILES]
    renamed = [f"tensors-{100000 + k}.safetensors" for k in range(len(files))]
    for old, new in zip(files, renamed, strict=True):
        (run / h.NEW / old).rename(run / h.NEW / new)
    rewrite_manifest(run / h.NEW, lambda doc: doc.__setitem__(n.M_FILES, renamed))
    assert savegame.load(run / h.NEW)["step"] == 2
    assert verify_checkpoint(LocalStorage(str(run)), h.NEW) == []


def test_ints_past_the_digit_limit_are_shown_by_every_command(base, tmp_path):
    big = {"$int": "f" * 5000}
    run = hostile_run(base, tmp_path, extra({"n": big, "k": {"$dict": [[big, [big]]]}}))
    assert savegame.load(run / h.NEW)["extra"]["n"] == 16**5000 - 1
    results = h.all_readers(run, tmp_path / "out")
    assert all(results[c].exit_code == 0 for c in ("inspect " + str(run / h.NEW), "inspect --json", "verify " + str(run)))
    assert "too large to show" in results["inspect " + str(run / h.NEW)].output
    assert '"$int": "' + "f" * 5000 in results["inspect --json"].output  # as the format writes it


def test_an_early_stopping_state_that_does_not_fit_is_refused_before_anything_loads(tmp_path):
    objs = h.objects()
    stopping = savegame.EarlyStopping("loss", mode="min", patience=3)
    with savegame.Checkpointer(tmp_path, objs, early_stopping=stopping, async_save=False) as ckpt:
        ckpt.save(1, metrics={"loss": 1.0})
    fresh = h.objects()
    with torch.no_grad():
        fresh["model"].weight.zero_()
    other = savegame.EarlyStopping("loss", mode="max", patience=3)
    with savegame.Checkpointer(tmp_path, fresh, early_stopping=other) as ckpt, \
            pytest.raises(IncompatibleStateError, match="mode"):
        ckpt.restore()
    assert not fresh["model"].weight.any()  # nothing was loaded


def test_a_torch_rng_state_the_generator_rejects_is_damaged(base, tmp_path, monkeypatch):
    """Its bytes pass their checksum, but torch refuses the state (all zeros is no MT19937 state):
    verify reports it, load refuses it, and restore falls back past it."""
    run = shutil.copytree(base[0], tmp_path / "run")
    real = savegame.engine.rng.capture

    def zeroed():
        out = real()
        out["torch"] = torch.zeros_like(out["torch"])
        return out

    monkeypatch.setattr(savegame.engine.rng, "capture", zeroed)
    with savegame.Checkpointer(run, h.objects(), async_save=False) as ckpt:
        ckpt.restore()
        ckpt.save(3)
    monkeypatch.undo()
    assert verify_checkpoint(LocalStorage(str(run)), "step-0000000003")
    with pytest.raises(CorruptCheckpointError, match="RNG"):
        savegame.load(run / "step-0000000003")
    assert h.restore(run, h.objects()).step == 2


@pytest.mark.parametrize("case", sorted(FINE))
def test_well_formed_oddities_restore(base, tmp_path, case):
    run = hostile_run(base, tmp_path, FINE[case])
    assert h.restore(run, h.objects()).step == 2
    h.all_readers(run, tmp_path / "out")


def test_a_long_double_scalar_is_shown_by_every_command(base, tmp_path):
    """A NumPy long double's .item() is itself: the JSON output once recursed on it without end (fuzzer find)."""
    run = hostile_run(base, tmp_path, extra({"ld": {"$np": ["<f16", 1]}}))
    results = h.all_readers(run, tmp_path / "out")  # each asserts: no "a bug in savegame", exit 0, 1 or 2
    assert results["inspect --json"].exit_code == 0
    assert json.loads(results["inspect --json"].stdout)["extra"]["ld"] in (str(np.longdouble(1)), 1.0)
