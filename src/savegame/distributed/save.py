"""A save in a distributed job: every rank writes its share, rank 0 commits only when all succeeded.

On the training thread every rank captures its tree and copies its tensors
(:func:`capture_share`, :func:`snapshot`); the caller may then change its state.
In the background (:func:`write`, on savegame's own ``bg`` group): rank 0 starts
the checkpoint's temporary directory and names it to all; the ranks exchange their
per-rank trees; ``torch.distributed.checkpoint.save`` plans (a replicated tensor
is written once, by one rank, spread across ranks) and every rank writes and
fsyncs its file; then rank 0 writes the manifest and renames the directory into
place. If any rank fails or dies, DCP reports it to every rank, rank 0 removes
the temporary directory and nothing is listed; every rank raises.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.checkpoint.storage import WriteResult

from savegame.distributed import split
from savegame.distributed.dcp_storage import SavegameWriter, tables
from savegame.distributed.job import Job, is_dtensor
from savegame.engine.dedup import Dedup
from savegame.engine.staging import Staging
from savegame.engine.writer import header_fields
from savegame.errors import RankFailedError, SavegameError, StorageError
from savegame.format import manifest
from savegame.format import names as n
from savegame.storage.base import Storage
from savegame.storage.commit import CommitStrategy

log = logging.getLogger("savegame.distributed")
ALIGN = 64  # each copy starts on a 64-byte boundary of the staging buffer, so any dtype may view it


@dataclass
class Share:
    """One rank's part of a save: the shared tree (with its tensors) and its own."""

    shared: split.Encoded
    mine: split.Encoded

    @property
    def nbytes(self) -> int:
        return sum(_local(t).nbytes for t in (*self.shared.tensors, *self.mine.tensors))


def share_of(tree: Mapping[str, Any], per_rank: frozenset[str], rank: int) -> Share:
    """Encode this rank's captured tree; raises (UnsupportedValueError ...) before anything changes."""
    shared, mine = split.split(tree, per_rank)
    return Share(split.encode(shared), split.encode(mine, split.rank_prefix(rank)))


def snapshot(share: Share, staging: Staging | None = None) -> Share:
    """A copy of every tensor (on the CPU), so the caller may change its state while the copy is written.

    With ``staging`` the copies are views of one host buffer reused by every save (page-locked when a
    source is on CUDA): the previous save must be fully written first, as ``save()`` waits for it.
    """
    tensors = [*share.shared.tensors, *share.mine.tensors]
    local = [_local(t).detach() for t in tensors]
    sizes = [-(-t.nbytes // ALIGN) * ALIGN for t in local]
    buffer = None
    if staging is not None:
        pinned = any(t.is_cuda for t in local) and torch.cuda.is_available()
        buffer = staging.buffer(0, sum(sizes), pinned)
    copies: list[torch.Tensor] = []
    offset = 0
    for tensor, src, size in zip(tensors, local, sizes, strict=True):
        if buffer is None:
            copy = torch.empty(src.shape, dtype=src.dtype)
        else:
            copy = buffer[offset:offset + src.nbytes].view(src.dtype).view(src.shape)
        offset += size
        copy.copy_(src)
        copies.append(_like(tensor, copy))
    k = len(share.shared.tensors)
    return Share(split.Encoded(share.shared.tree, copies[:k], share.shared.keys),
                 split.Encoded(share.mine.tree, copies[k:], share.mine.keys))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    if not is_dtensor(tensor):
        return tensor
    local: torch.Tensor = tensor._local_tensor  # type: ignore[attr-defined]  # to_local() is an autograd call
    return local


def _like(tensor: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
    """``copy`` as ``tensor`` was: a DTensor of the same placement (as torch's own async save does), or plain."""
    if not is_dtensor(tensor):
        return copy
    from torch.distributed.tensor import DTensor
    return DTensor(copy, tensor._spec, requires_grad=False)  # type: ignore[attr-defined,no-untyped-call]


@dataclass(frozen=True)
class Leader:
    """What only rank 0 knows about a save: its name, its manifest members and the commit."""

    name: str
    meta: dict[str, Any]
    commit: CommitStrategy


def write(job: Job, storage: Storage, share: Share, leader: Leader | None, dedup: Dedup | None = None) -> None:
    """Write ``share`` as this rank's part of the checkpoint; collective on ``job.bg``. Raises on every rank
    if any rank failed; then nothing is listed. With ``dedup`` (incremental, the same on every rank) each
    rank references the pieces an earlier save of it stored, and writes the rest into a pack."""
    tmp: str | None = job.from_leader(lambda: leader.commit.begin(storage, leader.name) if leader else None,
                               job.bg, "starting the save")
    assert tmp is not None
    try:
        _, trees = job.agree(lambda: None, job.bg, "gathering the per-rank states",
                             public=lambda _: (share.mine.tree, share.mine.keys))
        flat = dict(zip(share.shared.keys, share.shared.tensors, strict=True))
        flat.update(zip(share.mine.keys, share.mine.tensors, strict=True))

        def finish(metadata: Metadata, results: list[list[WriteResult]]) -> None:
            assert leader is not None
            body = manifest_body(job.world_size, share.shared, trees, leader.meta, metadata, results,
                                 packed=dedup is not None)
            leader.commit.commit(storage, tmp, leader.name, manifest.dumps(manifest.compact(body)))

        writer = SavegameWriter(storage, tmp, job.rank, finish if leader else None, dedup)
        try:
            dcp_save(flat, storage_writer=writer, planner=DefaultSavePlanner(), process_group=job.bg)
        except CheckpointException as exc:  # a BaseException: never let it past savegame unchanged
            raise translated(exc, job.rank) from None
        except RuntimeError as exc:  # gloo: a rank died or timed out inside DCP's collectives
            raise RankFailedError(f"the save failed: another rank stopped answering ({exc}); no checkpoint "
                                  "was listed, earlier ones are intact") from exc
    except BaseException:
        if leader is not None:
            leader.commit.abort(storage, tmp)
        if dedup is not None:
            dedup.forget()
        raise
    if dedup is not None:
        dedup.keep(writer.written)


def manifest_body(world_size: int, shared: split.Encoded, trees: list[tuple[Any, list[str]]],
                  meta: Mapping[str, Any], metadata: Metadata, results: list[list[WriteResult]], *,
                  packed: bool = False) -> dict[str, Any]:
    """The v3 manifest (v4 when ``packed``: pieces in the content store): rank 0's merged tree, every rank's
    own tree, and the tables of every piece."""
    keys, ranks, base = list(shared.keys), [], len(shared.keys)
    for tree, rank_keys in trees:
        ranks.append(split.renumber(tree, base))
        keys.extend(rank_keys)
        base += len(rank_keys)
    version = n.PACKED_FORMAT_VERSION if packed else n.SHARDED_FORMAT_VERSION
    return {**header_fields(version), **meta, n.M_WORLD: world_size,
            n.M_TREE: split.merged(shared.tree, ranks[0]), n.M_RANKS: ranks,
            **tables(metadata, results, keys, world_size, packed=packed)}


def translated(exc: CheckpointException, rank: int) -> SavegameError:
    """DCP's CheckpointException (a BaseException) as one savegame error naming the failed ranks."""
    failures = {r: e[0] if isinstance(e, tuple) else e for r, e in (getattr(exc, "failures", {}) or {}).items()}
    own = failures.get(rank)
    if isinstance(own, SavegameError):
        return own
    text = "; ".join(f"rank {r}: {type(e).__name__}: {e}" for r, e in sorted(failures.items())) or str(exc)
    if failures and all(isinstance(e, StorageError) for e in failures.values()):
        return StorageError(f"the save failed: {text}")
    return RankFailedError(f"the save failed: {text}; no checkpoint was listed, earlier ones are intact")
