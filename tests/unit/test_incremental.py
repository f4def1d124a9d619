"""Incremental checkpoints (issue 17): unchanged tensors are referenced, never written twice.

The size bound of a frozen backbone, exact restores of every checkpoint after random
retention deletions, a damaged shared pack named in every checkpoint that uses it with
restore("latest") falling back past them, and the change detection's guards.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import savegame
from savegame.engine.reader import read_manifest, verify_checkpoint
from savegame.errors import CorruptCheckpointError
from savegame.format import names as n
from savegame.run.directory import RunDir
from savegame.run.store import ContentStore
from savegame.storage import LocalStorage


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != n.LOCK_FILE)


def checkpoint_bytes(path: Path) -> int:
    """Bytes of the checkpoints and the content store (not the run's small bookkeeping files)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()
               and (f.parent.name == n.DATA_DIR or f.parent.name.startswith(n.CHECKPOINT_PREFIX)))


def frozen_model(width: int = 256, depth: int = 6, out: int = 8) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])
    for p in backbone.parameters():
        p.requires_grad_(False)
    model = torch.nn.Sequential(backbone, torch.nn.Linear(width, out))
    return model, torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(4, model[1].in_features)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def snapshot_state(*objects: object) -> list[dict[str, object]]:
    import copy
    return [copy.deepcopy(o.state_dict()) for o in objects]  # type: ignore[attr-defined]


def same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))  # type: ignore[arg-type]
    return a == b


def test_frozen_backbone_five_saves_fit_one_full_checkpoint_plus_changed_bytes(tmp_path: Path) -> None:
    """The issue's target: 5 checkpoints of model + optimizer <= one full checkpoint + 1.1x the changed bytes.

    Everything counts: packs, their headers and every manifest (a 6-layer backbone, a head of 64 outputs)."""
    model, opt = frozen_model(256, 6, 64)
    train_step(model, opt)
    full = savegame.Checkpointer(tmp_path / "full", {"model": model, "opt": opt})
    full.save(0)
    full.close()
    one_full = checkpoint_bytes(tmp_path / "full")

    run = tmp_path / "inc"
    ckpt = savegame.Checkpointer(run, {"model": model, "opt": opt}, incremental=True)
    changed, before = 0, None
    for step in range(5):
        train_step(model, opt)
        ckpt.save(step)
        now = {**{f"m.{k}": v.clone() for k, v in model.state_dict().items()},
               **{f"o.{i}.{k}": v.clone() for i, s in opt.state_dict()["state"].items() for k, v in s.items()}}
        if before is not None:
            changed += sum(v.nbytes for k, v in now.items() if not torch.equal(v, before[k]))
            changed += torch.get_rng_state().nbytes  # the RNG state moved too
        before = now
    ckpt.close()
    total = checkpoint_bytes(run)
    assert changed > 0
    assert total <= one_full + 1.1 * changed, (total, one_full, changed)
    assert disk_bytes(run / n.DATA_DIR) < 1.5 * one_full  # and the backbone is stored once


def test_every_checkpoint_restores_exactly_and_verifies(tmp_path: Path) -> None:
    model, opt = frozen_model(64, 3)
    ckpt = savegame.Checkpointer(tmp_path, {"model": model, "opt": opt}, incremental=True)
    expected = []
    for step in range(4):
        train_step(model, opt)
        ckpt.save(step)
        expected.append(snapshot_state(model, opt))
    ckpt.close()
    storage = LocalStorage(tmp_path)
    for step, (m, o) in enumerate(expected):
        name = f"step-{step:010d}"
        assert verify_checkpoint(storage, name) == []
        doc = read_manifest(storage, name)
        assert doc[n.M_VERSION] == n.PACKED_FORMAT_VERSION and all(n.is_pack_file(f) for f in doc[n.M_FILES])
        tree = savegame.load(tmp_path / name)["state"]
        assert same(tree["model"], m) and same(tree["opt"], o)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["train", "touch", "same", "delete"]), st.integers(0, 50)),
                    min_size=3, max_size=9),
       keep_last=st.sampled_from([None, 1, 2]))
def test_random_retention_and_deletions_keep_every_checkpoint_exact(tmp_path_factory: pytest.TempPathFactory,
                                                                    ops: list[tuple[str, int]],
                                                                    keep_last: int | None) -> None:
    """Saves with some tensors changed, others not, retention, and deletions of random checkpoints by hand
    through savegame between runs: every remaining checkpoint restores exactly and no pack is left unused."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(1)
    frozen, head = torch.nn.Linear(160, 160), torch.nn.Linear(16, 4)  # 100 KiB: fingerprinted; the rest hashed
    frozen.requires_grad_(False)
    table = torch.nn.Module()
    table.register_buffer("table", torch.zeros(40, 8))
    state = {"frozen": frozen, "head": head, "emb": table}

    def open_run() -> savegame.Checkpointer:
        ckpt = savegame.Checkpointer(run, state, incremental=True, keep_last=keep_last, async_save=False)
        ckpt.restore()
        return ckpt

    def values() -> list[torch.Tensor]:
        return [t.clone() for t in (frozen.weight, head.weight, table.table)]

    ckpt = open_run()
    expected: dict[str, list[torch.Tensor]] = {}
    for step, (op, k) in enumerate(ops):
        if op == "train":
            with torch.no_grad():
                head.weight.add_(0.1 * (k + 1))
        elif op == "touch":  # one row of a table written, as sparse updates do
            with torch.no_grad():
                table.table[k % 40].fill_(float(step + 1))
        elif op == "same":  # an in-place write of identical values: the counter moved, so it is written again
            with torch.no_grad():
                frozen.weight.copy_(frozen.weight.clone())
        elif op == "delete" and expected:
            ckpt.close()
            storage = LocalStorage(run)
            names = RunDir(storage).names()
            victim = names[k % len(names)]
            RunDir(storage).delete(victim)
            ContentStore(storage).sweep()
            left = RunDir(storage).names()  # retention deleted some too
            expected = {name: v for name, v in expected.items() if name in left}
            ckpt = open_run()  # restores the newest remaining checkpoint into the state
            assert not expected or all(torch.equal(a, b) for a, b in zip(values(), expected[max(expected)],
                                                                          strict=True))
        expected[os.path.basename(ckpt.save(step))] = values()
    ckpt.close()
    storage = LocalStorage(run)
    names = RunDir(storage).names()
    assert set(names) <= set(expected)
    for name in names:
        tree = savegame.load(run / name)["state"]
        got = [tree["frozen"]["weight"], tree["head"]["weight"], tree["emb"]["table"]]
        assert all(torch.equal(a, b) for a, b in zip(got, expected[name], strict=True)), name
        assert verify_checkpoint(storage, name) == []
    store = ContentStore(storage)
    used = set().union(*store.referenced().values())
    assert set(store.packs()) == used  # nothing unreferenced is left behind


def test_a_damaged_shared_pack_is_named_by_every_checkpoint_using_it_and_restore_falls_back(tmp_path: Path) -> None:
    model, opt = frozen_model(64, 3)
    ckpt = savegame.Checkpointer(tmp_path, {"model": model, "opt": opt}, incremental=True)
    for step in range(3):
        train_step(model, opt)
        ckpt.save(step)
    ckpt.close()
    storage = LocalStorage(tmp_path)
    first = read_manifest(storage, "step-0000000000")
    shared = first[n.M_FILES][0]  # the first save's pack holds the backbone every later save references
    users = [name for name in RunDir(storage).names() if shared in read_manifest(storage, name)[n.M_FILES]]
    assert len(users) == 3
    last = read_manifest(storage, "step-0000000002")
    entries = last[n.M_ENTRIES]
    used = [e for e, k in enumerate(entries[n.E_FILE]) if last[n.M_FILES][k] == shared]
    path = tmp_path / shared
    raw = bytearray(path.read_bytes())
    raw[8 + int.from_bytes(raw[:8], "little") + entries[n.E_START][used[0]]] ^= 0xFF  # a byte every save uses
    path.write_bytes(bytes(raw))
    problems = {name: verify_checkpoint(storage, name) for name in users}
    assert all(p and shared in p[0] for p in problems.values()), problems

    model2, opt2 = frozen_model(64, 3)
    again = savegame.Checkpointer(tmp_path, {"model": model2, "opt": opt2}, incremental=True)
    with pytest.raises(CorruptCheckpointError, match="every candidate"):
        again.restore()  # every checkpoint uses the damaged pack: none can be restored
    again.close()


def test_restore_latest_falls_back_to_a_checkpoint_that_does_not_use_the_damaged_pack(tmp_path: Path) -> None:
    model, opt = frozen_model(64, 3)
    plain = savegame.Checkpointer(tmp_path, {"model": model, "opt": opt})
    train_step(model, opt)
    plain.save(0)  # a stand-alone (v2) checkpoint: uses no pack
    plain.close()
    expected = snapshot_state(model)
    ckpt = savegame.Checkpointer(tmp_path, {"model": model, "opt": opt}, incremental=True)
    ckpt.restore()
    for step in (1, 2):
        with torch.no_grad():
            model[1].weight.add_(1.0)
        ckpt.save(step)
    ckpt.close()
    storage = LocalStorage(tmp_path)
    packs = ContentStore(storage).referenced()
    damaged = sorted(packs["step-0000000001"])[0]
    (tmp_path / damaged).write_bytes((tmp_path / damaged).read_bytes()[:-10])  # truncated
    model2, opt2 = frozen_model(64, 3)
    again = savegame.Checkpointer(tmp_path, {"model": model2, "opt": opt2}, incremental=True)
    info = again.restore()
    assert info is not None and info.step == 0
    assert same(model2.state_dict(), expected[0])
    again.close()


def test_unchanged_detection_is_never_trusted_blindly(tmp_path: Path) -> None:
    """A write that bypasses the version counter (through .data) is caught by the fingerprint, a write of
    one byte of a small tensor by its full digest; an in-place write bumps the counter."""
    holder = torch.nn.Module()
    holder.register_buffer("big", torch.zeros(1 << 18))  # 1 MiB: fingerprinted
    holder.register_buffer("small", torch.zeros(100))  # hashed in full
    big, small = holder.big, holder.small
    state = {"t": holder}
    ckpt = savegame.Checkpointer(tmp_path, state, incremental=True, async_save=False)
    ckpt.save(0)
    big.data[:64] = 2.0  # no version bump (.data has its own counter); the fingerprint samples the first block
    small.data[7] = 3.0
    ckpt.save(1)
    ckpt.save(2)  # nothing changed: everything referenced
    ckpt.close()
    storage = LocalStorage(tmp_path)
    tree1 = savegame.load(tmp_path / "step-0000000001")["state"]
    assert torch.equal(tree1["t"]["big"], big) and torch.equal(tree1["t"]["small"], small)
    files2 = read_manifest(storage, "step-0000000002")[n.M_FILES]
    files1 = read_manifest(storage, "step-0000000001")[n.M_FILES]
    assert set(files2) <= set(files1)  # step 2 wrote no pack


def test_a_pack_deleted_behind_the_writers_back_makes_the_next_save_write_everything(tmp_path: Path) -> None:
    model, opt = frozen_model(64, 2)
    ckpt = savegame.Checkpointer(tmp_path, {"model": model, "opt": opt}, incremental=True, async_save=False)
    ckpt.save(0)
    for pack in ContentStore(LocalStorage(tmp_path)).packs():
        (tmp_path / pack).unlink()
    ckpt.save(1)  # logged, and every tensor written again
    ckpt.close()
    assert verify_checkpoint(LocalStorage(tmp_path), "step-0000000001") == []


def test_a_pack_gone_between_planning_and_commit_fails_the_save_cleanly(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = frozen_model(64, 2)
    ckpt = savegame.Checkpointer(tmp_path, {"model": model, "opt": opt}, incremental=True, async_save=False)
    ckpt.save(0)
    from savegame.engine import packs as packs_module
    real = packs_module.reference

    def vanish(storage, body, reuse, *, fresh):  # type: ignore[no-untyped-def]
        for pack in {loc.file for loc in reuse.values()}:
            (tmp_path / pack).unlink()
        real(storage, body, reuse, fresh=fresh)

    monkeypatch.setattr(packs_module, "reference", vanish)
    with pytest.raises(savegame.errors.StorageError, match="disappeared from the content store"):
        ckpt.save(1)
    monkeypatch.setattr(packs_module, "reference", real)
    ckpt.save(2)  # the failed save made the next one write everything
    ckpt.close()
    assert not (tmp_path / "step-0000000001").exists()
    assert verify_checkpoint(LocalStorage(tmp_path), "step-0000000002") == []


def test_old_readers_refuse_v4_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = frozen_model(32, 1)
    ckpt = savegame.Checkpointer(tmp_path, {"model": model}, incremental=True)
    ckpt.save(0)
    ckpt.close()
    monkeypatch.setattr(n, "READABLE_VERSION", n.SHARDED_FORMAT_VERSION)
    with pytest.raises(CorruptCheckpointError, match="format version 4 is not supported"):
        read_manifest(LocalStorage(tmp_path), "step-0000000000")


def test_a_plain_run_sweeps_packs_its_retention_freed(tmp_path: Path) -> None:
    """Turning incremental off later still reclaims the packs of the incremental checkpoints retention deletes."""
    model, opt = frozen_model(32, 1)
    ckpt = savegame.Checkpointer(tmp_path, {"model": model}, incremental=True)
    ckpt.save(0)
    ckpt.close()
    for step in (1, 2):  # (the checkpoint a process restored is kept while it runs)
        plain = savegame.Checkpointer(tmp_path, {"model": model}, keep_last=1)
        plain.restore()
        plain.save(step)
        plain.close()
    assert "step-0000000000" not in RunDir(LocalStorage(tmp_path)).names()
    assert ContentStore(LocalStorage(tmp_path)).packs() == []


class FreshCopy:
    """A state_dict() that makes a new tensor at each call (an EMA copy, a cast)."""

    def __init__(self) -> None:
        self.weight = torch.ones(1 << 17)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.weight = state["weight"].clone()


def test_fresh_copies_are_not_kept_alive_between_saves(tmp_path: Path) -> None:
    fresh, kept = FreshCopy(), torch.nn.Linear(256, 256)
    ckpt = savegame.Checkpointer(tmp_path, {"fresh": fresh, "kept": kept}, incremental=True)
    ckpt.save(0)
    ckpt.wait()
    held = [s.tensor for s in ckpt._dedup._seen.values()]  # type: ignore[union-attr]
    assert held and all(t.nbytes != fresh.weight.nbytes for t in held)  # the layer's tensors, not the copy
    fresh.weight[5] = 2.0
    ckpt.save(1)
    ckpt.close()
    assert torch.equal(savegame.load(tmp_path / "step-0000000001")["state"]["fresh"]["weight"], fresh.weight)


def test_a_small_unchanged_tensor_does_not_keep_an_old_pack_alive(tmp_path: Path) -> None:
    """Full training: the RNG state does not change between saves, everything else does. Referencing the RNG
    state's bytes in the first pack would keep that whole pack alive for ever; it is rewritten instead."""
    model = torch.nn.Linear(256, 256)
    ckpt = savegame.Checkpointer(tmp_path, {"model": model}, incremental=True, keep_last=2)
    for step in range(4):
        with torch.no_grad():
            model.weight.add_(1.0)
            model.bias.add_(1.0)
        ckpt.save(step)
    ckpt.close()
    store = ContentStore(LocalStorage(tmp_path))
    assert len(RunDir(LocalStorage(tmp_path)).names()) == 2 and len(store.packs()) == 2


def test_after_falling_back_past_a_damaged_checkpoint_saves_never_reference_its_bytes(tmp_path):
    """restore() skipped step 2 (a damaged pack); training then reproduces step 2's bytes exactly. The
    next save must write them anew, not reference the damaged copy the skipped manifest points at."""
    from savegame.format import names as n
    from savegame.storage import LocalStorage

    class Holder:
        def __init__(self) -> None:
            self.w = torch.zeros(64, 64)

        def state_dict(self) -> dict:
            return {"w": self.w}

        def load_state_dict(self, state: dict) -> None:
            self.w = state["w"].clone()

    holder = Holder()
    with savegame.Checkpointer(tmp_path, {"h": holder}, incremental=True) as ckpt:
        ckpt.save(1)
        holder.w = torch.ones(64, 64)
        ckpt.save(2)
    storage = LocalStorage(tmp_path)
    doc = read_manifest(storage, "step-0000000002")
    e = doc[n.M_TENSORS][n.T_ENTRY][0]
    pack = tmp_path / doc[n.M_FILES][doc[n.M_ENTRIES][n.E_FILE][e]]
    raw = bytearray(pack.read_bytes())
    raw[-1] ^= 0xFF  # the last byte of the pack: step 2's new bytes
    pack.write_bytes(bytes(raw))
    holder = Holder()
    with savegame.Checkpointer(tmp_path, {"h": holder}, incremental=True) as ckpt:
        assert ckpt.restore().step == 1
        holder.w = torch.ones(64, 64)  # the same bytes step 2 held
        ckpt.save(3)
    assert verify_checkpoint(storage, "step-0000000003") == []
    assert torch.equal(savegame.load(tmp_path / "step-0000000003")["state"]["h"]["w"], torch.ones(64, 64))
