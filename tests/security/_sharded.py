"""A real distributed (format v3) run, and every reader of it, for the hostile-sharded tests.

:func:`make_run` runs the 2-rank DDP job of tests/distributed (checkpoints at steps 3, 6
and 9), then stores the newest checkpoint's first model weight in two row chunks, one per
rank's file, as FSDP would: the v3 chunk records then have a real, valid record to damage.
"""

from __future__ import annotations

import json
import os
import shutil
import types
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

import savegame
from savegame.distributed import restore as job_restore
from savegame.distributed.dcp_storage import EntryReader, SavegameReader, metadata_of
from savegame.engine import reader
from savegame.engine.writer import write_tensor_file
from savegame.errors import CorruptCheckpointError, SavegameError
from savegame.format import codec, layout, manifest
from savegame.format import names as n
from savegame.storage.local import LocalStorage
from tests.distributed import _worker, launch
from tests.security import _hostile as h

OLD, NEW = "step-0000000006", "step-0000000009"
WORKER = str(Path(_worker.__file__).resolve())
CHUNKED = 0  # the tensor stored in chunks: state.model.0.weight, [16, 8]


def make_run(path: Path) -> torch.Tensor:
    """The DDP job's run directory, its newest checkpoint with tensor 0 in two chunks; returns tensor 0."""
    launch.run(WORKER, 2, "ddp", str(path), "10", "20", timeout=120)
    whole = savegame.load(path / NEW)["state"]["model"]["0.weight"].clone()
    shard_rows(path / NEW, CHUNKED)
    return whole


def shard_rows(ckpt: Path, j: int) -> None:
    """Store tensor ``j`` (compact) as two row halves: the first where it was, the second in file 1."""
    doc, values = read_all(ckpt)
    e = doc[n.M_TENSORS][n.T_ENTRY][j]
    whole, half = values[e], values[e].shape[0] // 2
    values[e] = whole[:half].clone()
    values.append(whole[half:].clone())
    doc[n.M_TENSORS][n.T_CHUNKS] = [{"tensor": j, "shape": list(whole.shape),
                                     "chunks": [[e, [0] * whole.dim()], [len(values) - 1, [half] + [0] * (whole.dim() - 1)]]}]
    rewrite(ckpt, doc, values, [*doc[n.M_ENTRIES][n.E_FILE], 1])


def read_all(ckpt: Path) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """A checkpoint's manifest and every entry's tensor."""
    storage, name = LocalStorage(str(ckpt.parent)), ckpt.name
    doc = reader.read_manifest(storage, name)
    pieces = EntryReader(storage, name, doc, verify=True)
    values = [pieces.read(e).clone() for e in range(len(doc[n.M_ENTRIES][n.E_FILE]))]
    pieces.close()
    return doc, values


def rewrite(ckpt: Path, doc: dict[str, Any], values: list[torch.Tensor], file_of: list[int]) -> None:
    """Write every tensor file anew with ``values`` (per entry; entries beyond the table are appended to
    their file), and the manifest with its entry table, checksums and header checksums to match."""
    storage, name, entries = LocalStorage(str(ckpt.parent)), ckpt.name, doc[n.M_ENTRIES]
    rank = [*entries[n.E_START], *[1 << 62] * (len(values) - len(entries[n.E_START]))]  # new ones go last
    out: dict[str, list[Any]] = {n.E_FILE: file_of, n.E_DTYPE: [codec.dtype_name(v.dtype) for v in values],
                                 n.E_SHAPE: [list(v.shape) for v in values], n.E_START: [0] * len(values),
                                 n.E_END: [0] * len(values), n.E_SUM: [""] * len(values)}
    headers = []
    for k, file in enumerate(doc[n.M_FILES]):
        mine = sorted((i for i in range(len(values)) if file_of[i] == k), key=rank.__getitem__)
        plan = layout.TensorPlan(files=[list(range(len(mine)))])
        for i in mine:
            out[n.E_START][i] = plan.nbytes
            plan.add(values[i], values[i].dtype, tuple(values[i].shape))
            plan.start.append(out[n.E_START][i])
            plan.shard.append(0)
            out[n.E_END][i] = plan.nbytes
        sums: list[Any] = [0] * len(mine)
        os.remove(ckpt / file)
        headers.append(str(write_tensor_file(storage, f"{name}/{file}", plan, 0, None, sums)))
        for i, value in zip(mine, sums, strict=True):
            out[n.E_SUM][i] = str(value)
    doc[n.M_ENTRIES], doc[n.M_FILE_CHECKSUMS] = out, headers
    (ckpt / n.MANIFEST).write_bytes(manifest.dumps(manifest.compact(doc)))


def stored(ckpt: Path) -> dict[str, Any]:
    raw = json.loads((ckpt / n.MANIFEST).read_bytes())
    raw.pop(n.M_CHECKSUM)
    return raw


def model_and_optimizer() -> dict[str, Any]:
    """The worker's model (unwrapped: a single process restores a DDP checkpoint into it) and optimizer."""
    model = _worker.model()
    return {"model": model, "optimizer": torch.optim.AdamW(model.parameters(), lr=0.01)}


def restore(run: Path, objs: dict[str, Any], which: Any = "latest") -> Any:
    with savegame.Checkpointer(run, objs) as ckpt:
        return ckpt.restore(which, strict=False)  # the loader (saved per rank) is not given


def as_rank(run: Path, rank: int, world: int = 2) -> Any:
    """What a rank of a ``world``-rank job reads of the newest checkpoint (the steps of a distributed
    restore, without a process group: DCP's loader runs with no_dist); a SavegameError if refused."""
    storage, job = LocalStorage(str(run)), types.SimpleNamespace(rank=rank, world_size=world, fg=None)
    try:
        doc = reader.read_manifest(storage, NEW)
        planned = job_restore.plan(job, storage, NEW, doc, model_and_optimizer(), verify=True)  # type: ignore[arg-type]
        job_restore.load(job, storage, NEW, planned, verify=True)  # type: ignore[arg-type]
        return job_restore.finish(job, planned)  # type: ignore[arg-type]
    except SavegameError as exc:
        return exc


def dcp_read(run: Path) -> Any:
    """DCP's loader straight on :class:`SavegameReader` for every stored tensor; the failure it raised
    (CheckpointException unwrapped) if any. ``metadata_of`` sees only manifests that :func:`manifest.loads` passed."""
    storage = LocalStorage(str(run))
    try:
        doc = reader.read_manifest(storage, NEW)
    except CorruptCheckpointError as exc:
        return exc
    metadata, _ = metadata_of(doc)
    dest = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in
            metadata.state_dict_metadata.items()}
    try:
        dcp_load(dest, storage_reader=SavegameReader(storage, NEW, doc), no_dist=True)
    except CheckpointException as exc:
        failures = [e[0] if isinstance(e, tuple) else e for e in (exc.failures or {}).values()]
        assert failures and all(isinstance(e, SavegameError) for e in failures), failures
        return failures[0]
    except SavegameError as exc:
        return exc
    return dest


def cli(run: Path, out: Path) -> dict[str, Any]:
    os.makedirs(out, exist_ok=True)
    new = str(run / NEW)
    return {"verify": h.run_cli(["verify", str(run)]), "inspect": h.run_cli(["inspect", new]),
            "inspect --json": h.run_cli(["inspect", "--json", "--tree", new]),
            "export": h.run_cli(["export", new, "--to", str(out / "w.safetensors")])}


def all_readers(run: Path, out: Path, objs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every reader on the run whose newest checkpoint is hostile: its result or the SavegameError it
    raised (anything else propagates, failing the test). ``objs`` are what restore() loads into."""
    objs = model_and_optimizer() if objs is None else objs
    return {"load": h.attempt(lambda: savegame.load(run / NEW)),
            "load_mmap": h.attempt(lambda: savegame.load(run / NEW, mmap=True)),
            "restore": h.attempt(lambda: restore(run, objs)),
            "rank0": as_rank(run, 0), "rank1": as_rank(run, 1), "rank0_of_3": as_rank(run, 0, 3),
            "dcp": dcp_read(run), **cli(run, out)}


def copy_run(base: Path, dest: Path) -> Path:
    return Path(shutil.copytree(base, dest))
