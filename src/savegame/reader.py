"""From a checkpoint directory back to a state tree, verifying as it reads.

Every problem (missing files, truncation, bad checksums, malformed manifest)
is a :class:`~savegame.errors.CorruptCheckpointError` naming the checkpoint.
Nothing here can execute code: the manifest is JSON and tensor files are raw
bytes behind a safetensors header.

Reading the entries' bytes into tensors is :mod:`savegame.readinto`.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from savegame import readinto, todevice
from savegame.errors import ConfigurationError, CorruptCheckpointError, StorageError
from savegame.format import checksum, codec, layout, manifest
from savegame.format import names as n
from savegame.format.tensorfile import CHUNK, read_header
from savegame.gcpause import pausing
from savegame.storage.base import Storage

PIECE = 1 << 20  # checked then copied while still in cache


@pausing
def read_manifest(storage: Storage, name: str) -> dict[str, Any]:
    where = f"{storage.root}/{name}"
    try:
        raw = storage.read_bytes(f"{name}/{n.MANIFEST}")
    except StorageError as exc:
        raise CorruptCheckpointError(f"{where}: manifest cannot be read ({exc}); the checkpoint is incomplete") from exc
    return manifest.loads(raw, where)


def decode_meta(doc: Mapping[str, Any]) -> dict[str, Any]:
    """Step, epoch, metrics, extra and time of a manifest, decoded."""
    return {
        "step": doc[n.M_STEP],
        "epoch": doc.get(n.M_EPOCH),
        "metrics": codec.decode(doc.get(n.M_METRICS, {}), ()),
        "extra": codec.decode(doc.get(n.M_EXTRA), ()),
        "time": doc.get(n.M_TIME),
    }


def data_bytes(doc: Mapping[str, Any]) -> int:
    """The number of tensor data bytes a checkpoint holds (from its manifest)."""
    entries = doc[n.M_ENTRIES]
    return sum(map(operator.sub, entries[n.E_END], entries[n.E_START]))


def data_files(doc: Mapping[str, Any]) -> list[str]:
    """The names of a checkpoint's tensor files, relative to its directory."""
    return list(doc[n.M_FILES])


def tensor_meta(doc: Mapping[str, Any]) -> list[tuple[str, list[int]]]:
    """(dtype name, shape) of every tensor of the tree, as the manifest records them."""
    entries, table = doc[n.M_ENTRIES], doc[n.M_TENSORS]
    dtypes, shapes = entries[n.E_DTYPE], entries[n.E_SHAPE]
    out = [(dtypes[e], shapes[e]) for e in table[n.T_ENTRY]]
    for view in table[n.T_VIEWS]:
        out[view["tensor"]] = (view.get("dtype"), view.get("shape"))
    return out


def quick_check(storage: Storage, name: str, doc: Mapping[str, Any]) -> list[str]:
    """Problems visible without reading the data: missing or truncated tensor files, bad headers."""
    problems, algo, ends = [], checksum.Algorithm(doc[n.M_CHECKSUM_ALGO]), readinto.file_ends(doc)
    for k, (file, expected) in enumerate(zip(doc[n.M_FILES], doc[n.M_FILE_CHECKSUMS], strict=True)):
        where = f"{storage.root}/{name}/{file}"
        try:
            size = storage.size(f"{name}/{file}")
            with storage.open_read(f"{name}/{file}") as f:
                start, _ = read_header(f, size, where, expected, algo=algo)
            if start + ends[k] > size:
                problems.append(f"{where}: truncated ({size} bytes, needs {start + ends[k]})")
        except (CorruptCheckpointError, StorageError) as exc:
            problems.append(str(exc))
    return problems


def device_of(map_location: torch.device | str | None) -> torch.device | None:
    """``map_location`` as a device this process can use; otherwise a ConfigurationError naming it."""
    if map_location is None:
        return None
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"map_location must be a device such as 'cpu', 'cuda:0' or torch.device('meta'), got {map_location!r}"
        ) from exc
    if device.type not in ("cpu", "meta"):
        try:
            torch.empty(0, device=device)
        except (AssertionError, RuntimeError) as exc:  # torch raises AssertionError when built without CUDA
            reason = (str(exc).strip().splitlines() or ["no such device"])[0][:200]
            raise ConfigurationError(
                f"map_location {str(device)!r} is not available in this process ({reason}); "
                "pass map_location='cpu' to load the checkpoint on this machine"
            ) from exc
    return device


@pausing
def read_tree(storage: Storage, name: str, doc: Mapping[str, Any], *, verify: bool = True,
              map_location: torch.device | str | None = None, mmap: bool = False,
              targets: Mapping[int, torch.Tensor] | None = None, follow: set[int] | None = None) -> Any:
    """Decode the full state tree of checkpoint ``name`` (its manifest already parsed as ``doc``).

    ``targets`` maps tensor numbers of the tree to tensors the caller owns (CPU
    or CUDA, contiguous, same dtype and shape): their bytes are read straight
    into them and the tree holds those very tensors. Every other tensor owns its
    storage (tensors that shared storage when saved share it again), so a tensor
    handed to ``load_state_dict`` never keeps a file buffer alive; with
    ``mmap=True`` tensors are lazy views of the files instead. ``map_location``
    moves the tensors in ``follow`` (None: all) and those saved off the CPU (see
    :func:`savegame.todevice.entry_places`); GPU-bound bytes are streamed to the
    GPU without a CPU copy. NumPy arrays stay on the CPU whatever
    ``map_location`` says. If a check fails part-way, targets may hold some of
    the checkpoint's bytes already.
    """
    device = todevice.resolve(device_of(map_location))
    chosen = _by_entry(doc, targets or {})
    count = len(doc[n.M_ENTRIES][n.E_FILE])
    places = todevice.entry_places(doc[n.M_TENSORS], count, device, follow, chosen)
    table = doc[n.M_TENSORS]
    if places is None:  # everything on the CPU
        read = readinto.read_entries(storage, name, doc, verify=verify, lazy=mmap, targets=chosen)
        return codec.decode(doc.get(n.M_TREE), layout.tensors_from_entries(table, read))
    fresh = {} if mmap else todevice.allocate(doc[n.M_ENTRIES], readinto.dtypes_of(doc[n.M_ENTRIES][n.E_DTYPE]),
                                              places, chosen)
    read = readinto.read_entries(storage, name, doc, verify=verify, lazy=mmap, targets={**chosen, **fresh})
    placed = [t if place is None or t.device == place else t.to(place) for t, place in zip(read, places, strict=True)]
    arrays = _OnCpu(layout.tensors_from_entries(table, read))
    return codec.decode(doc.get(n.M_TREE), layout.tensors_from_entries(table, placed), arrays=arrays)


class _OnCpu(Sequence[torch.Tensor]):
    """The tree's tensors as read, brought to the CPU when asked for: NumPy arrays are rebuilt from them."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, index: Any) -> Any:
        tensor = self.tensors[index]
        return tensor if tensor.is_cpu else tensor.cpu()


def _by_entry(doc: Mapping[str, Any], targets: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Targets keyed by entry, keeping only those that can take the entry's bytes as they are."""
    if not targets:
        return {}
    entries, table = doc[n.M_ENTRIES], doc[n.M_TENSORS]
    spans = {table[n.T_ENTRY][v["tensor"]] for v in table[n.T_VIEWS]}
    dtypes = readinto.dtypes_of(entries[n.E_DTYPE])
    chosen: dict[int, torch.Tensor] = {}
    owners: dict[int, int] = {}
    for j, target in targets.items():
        e = table[n.T_ENTRY][j]
        fits = (e not in spans and (target.is_cpu or target.is_cuda) and target.dtype == dtypes[e]
                and target.is_contiguous()
                and list(target.shape) == entries[n.E_SHAPE][e])
        if not fits or chosen.get(e, target) is not target:
            chosen.pop(e, None)
            continue
        if target.numel() and owners.setdefault(target.data_ptr(), e) != e:
            chosen.pop(owners[target.data_ptr()], None)  # two entries into one memory: neither goes direct
            continue
        chosen[e] = target
    return chosen


def verify_checkpoint(storage: Storage, name: str) -> list[str]:
    """Every problem found in checkpoint ``name`` (empty when intact); reads in bounded chunks."""
    try:
        doc = read_manifest(storage, name)
        algo, entries = checksum.Algorithm(doc[n.M_CHECKSUM_ALGO]), doc[n.M_ENTRIES]
        for k, (file, expected) in enumerate(zip(doc[n.M_FILES], doc[n.M_FILE_CHECKSUMS], strict=True)):
            mine = [e for e, f in enumerate(entries[n.E_FILE]) if f == k]
            _verify_file(storage, name, file, expected, algo, entries, mine)
        codec.decode(doc.get(n.M_TREE), [torch.empty(0)] * len(doc[n.M_TENSORS][n.T_ENTRY]))
    except CorruptCheckpointError as exc:
        return [str(exc)]
    return []


def _verify_file(storage: Storage, name: str, file: str, expected: checksum.Value, algo: checksum.Algorithm,
                 entries: Mapping[str, Any], mine: list[int]) -> None:
    where = f"{storage.root}/{name}/{file}"
    try:
        size = storage.size(f"{name}/{file}")
        with storage.open_read(f"{name}/{file}") as f:
            start, _ = read_header(f, size, where, expected, algo=algo)
            for e in sorted(mine, key=lambda e: entries[n.E_START][e]):
                f.seek(start + entries[n.E_START][e])
                running, left = algo.running(), entries[n.E_END][e] - entries[n.E_START][e]
                while left:
                    chunk = f.read(min(CHUNK, left))
                    if not chunk:
                        raise CorruptCheckpointError(f"{where}: truncated (entry {e} incomplete)")
                    running.update(chunk)
                    left -= len(chunk)
                if running.value() != entries[n.E_SUM][e]:
                    raise CorruptCheckpointError(f"{where}: checksum mismatch in entry {e}")
    except StorageError as exc:
        raise CorruptCheckpointError(f"{where}: cannot be read ({exc})") from exc
