"""From a checkpoint directory back to a state tree, verifying as it reads.

Every problem (missing files, truncation, bad checksums, malformed manifest)
is a :class:`~savegame.errors.CorruptCheckpointError` naming the checkpoint.
Nothing here can execute code: the manifest is JSON and tensor files are raw
bytes behind a safetensors header.

Reading the entries' bytes into tensors is :mod:`savegame.engine.readinto`.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from savegame.engine import readinto, rng, todevice
from savegame.engine.gcpause import pausing
from savegame.errors import ConfigurationError, CorruptCheckpointError, StorageError
from savegame.format import checksum, chunks, codec, compression, layout, manifest
from savegame.format import names as n
from savegame.format.tensorfile import CHUNK, read_header
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
    """Step, epoch, metrics, extra and time of a manifest, decoded; CorruptCheckpointError if malformed."""
    metrics = codec.decode(doc.get(n.M_METRICS, {}), ())
    if not isinstance(metrics, dict) or not all(isinstance(k, str) and type(v) in (float, int)
                                                for k, v in metrics.items()):
        raise CorruptCheckpointError("the checkpoint's metrics are not a mapping of names to numbers")
    return {
        "step": doc[n.M_STEP],
        "epoch": doc.get(n.M_EPOCH),
        "metrics": metrics,
        "extra": codec.decode(doc.get(n.M_EXTRA), ()),
        "time": doc.get(n.M_TIME),
    }


def decode_tree(doc: Mapping[str, Any], tensors: Sequence[Any], arrays: Sequence[Any] | None = None) -> dict[str, Any]:
    """The checkpoint's tree around ``tensors`` (per tensor number: tensors, or :class:`layout.Spec`
    stand-ins), checked: its parts have the shapes restore needs. CorruptCheckpointError otherwise."""
    tree = codec.decode(doc.get(n.M_TREE), tensors, arrays=arrays)
    if not isinstance(tree, dict) or not isinstance(tree.get(n.TREE_STATE), dict):
        raise CorruptCheckpointError("the state tree is not a mapping with a 'state' mapping")
    if not all(isinstance(k, str) for k in tree[n.TREE_STATE]):
        raise CorruptCheckpointError("the state tree names a state by something other than a str")
    rng.check(tree.get(n.TREE_RNG))
    _check_run(tree.get(n.TREE_RUN))
    types = tree.get(n.TREE_TYPES)
    if types is not None and not (isinstance(types, dict) and all(type(v) is str for v in types.values())):
        raise CorruptCheckpointError("the recorded types are not a mapping of names to class names")
    return tree


def decode_ranks(doc: Mapping[str, Any], tensors: Sequence[Any],
                 arrays: Sequence[Any] | None = None) -> list[dict[str, Any]] | None:
    """Each rank's own tree of a distributed (v3) checkpoint, ``{"rng", "state"}``, decoded around
    ``tensors`` as :func:`decode_tree` does and checked; None for a single process's checkpoint."""
    if n.M_WORLD not in doc:  # (v4 has ranks only when a distributed job wrote it)
        return None
    out = []
    for rank, encoded in enumerate(doc[n.M_RANKS]):
        tree = codec.decode(encoded, tensors, arrays=arrays)
        state = tree.get(n.TREE_STATE) if isinstance(tree, dict) else None
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise CorruptCheckpointError(f"rank {rank}'s state tree is not a mapping of names to states")
        try:
            rng.check(tree.get(n.TREE_RNG))
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(f"rank {rank}: {exc}") from None
        out.append(tree)
    return out


def _check_run(run: Any) -> None:
    """The run state: ``{"best": {metric: {"mode", "entries": [[value, step], ...]}}, "early_stopping": ...}``."""
    if run is None:
        return
    best = run.get("best") if isinstance(run, dict) else None
    if not isinstance(run, dict) or not isinstance(best, dict | None) \
            or not isinstance(run.get("early_stopping"), dict | None):
        raise CorruptCheckpointError("the run state is not a mapping with 'best' and 'early_stopping' mappings")
    stopping = run.get("early_stopping") or {}
    numbers = [stopping.get(k) for k in ("best", "smoothed", "best_step", "last_step", "bad_epochs")]
    if not all(v is None or type(v) is float or (type(v) is int and abs(v) < 2**63) for v in numbers) \
            or not isinstance(stopping.get("config", {}), dict):
        raise CorruptCheckpointError("the early-stopping state is malformed")
    for metric, held in (best or {}).items():
        entries = held.get("entries") if isinstance(held, dict) else None
        mode = held.get("mode") if isinstance(held, dict) else None
        if not (isinstance(metric, str) and type(mode) is str and mode in ("min", "max")
                and isinstance(entries, list) and all(_best_entry(e) for e in entries)):
            raise CorruptCheckpointError(f"the best-checkpoint state of metric {codec.brief(metric)} is malformed")


def _best_entry(entry: Any) -> bool:
    """[value, step]: a finite or infinite float (or an int) and a step."""
    return (isinstance(entry, list) and len(entry) == 2 and type(entry[1]) is int and 0 <= entry[1] < 2**63
            and (type(entry[0]) is float or (type(entry[0]) is int and abs(entry[0]) < 2**63)))


def tensor_specs(doc: Mapping[str, Any]) -> list[layout.Spec]:
    """A :class:`layout.Spec` (dtype and shape) per tensor of the tree, from the manifest alone."""
    known: dict[str, Any] = {}
    out = []
    for name, shape in tensor_meta(doc):
        dtype = known.get(name) or known.setdefault(name, codec.dtype_from_name(name))
        out.append(layout.Spec(dtype, shape))
    return out


def check(doc: Mapping[str, Any]) -> None:
    """Everything about a checkpoint that its manifest alone decides (its data is not read)."""
    decode_meta(doc)
    specs = tensor_specs(doc)
    decode_tree(doc, specs)
    decode_ranks(doc, specs)


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
    for record in chunks.chunked(table):
        out[record["tensor"]] = (dtypes[table[n.T_ENTRY][record["tensor"]]], record["shape"])
    return out


def quick_check(storage: Storage, name: str, doc: Mapping[str, Any]) -> list[str]:
    """Problems visible without reading the data: missing or truncated tensor files, bad headers."""
    try:
        check(doc)
    except CorruptCheckpointError as exc:
        return [f"{storage.root}/{name}: {exc}"]
    problems, algo, ends = [], checksum.Algorithm(doc[n.M_CHECKSUM_ALGO]), readinto.file_ends(doc)
    for k, (file, expected) in enumerate(zip(doc[n.M_FILES], doc[n.M_FILE_CHECKSUMS], strict=True)):
        where = f"{storage.root}/{n.file_path(name, file)}"
        try:
            size = storage.size(n.file_path(name, file))
            with storage.open_read(n.file_path(name, file)) as f:
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
              targets: Mapping[int, torch.Tensor] | None = None, follow: set[int] | None = None) -> dict[str, Any]:
    """Decode and check the full state tree of checkpoint ``name`` (its manifest already parsed as ``doc``).

    ``targets`` maps tensor numbers of the tree to tensors the caller owns (CPU
    or CUDA, contiguous, same dtype and shape): their bytes are read straight
    into them and the tree holds those very tensors. The tree is decoded and
    checked (:func:`decode_tree`) before any byte is read, so a malformed tree
    leaves the targets untouched; a checksum that fails part-way through the
    data may leave some of the checkpoint's bytes in them. Every other tensor
    owns its storage (tensors that shared storage when saved share it again), so
    a tensor handed to ``load_state_dict`` never keeps a file buffer alive; with
    ``mmap=True`` tensors are lazy views of the files instead. ``map_location``
    moves the tensors in ``follow`` (None: all) and those saved off the CPU (see
    :func:`savegame.engine.todevice.entry_places`); GPU-bound bytes are streamed to the
    GPU without a CPU copy. NumPy arrays stay on the CPU whatever
    ``map_location`` says. The tree of a distributed (v3) checkpoint also holds
    ``"ranks"``: each rank's own tree (:func:`decode_ranks`), checked as the rest is.
    """
    device = todevice.resolve(device_of(map_location))
    table, entries = doc[n.M_TENSORS], doc[n.M_ENTRIES]
    if not mmap:
        check_sizes(storage, name, doc)  # before allocating what the manifest asks for
    chosen = _by_entry(doc, targets or {})
    places = todevice.entry_places(table, len(entries[n.E_FILE]), device, follow, chosen)
    if mmap:
        tree = _decode_placed(doc, readinto.read_entries(storage, name, doc, verify=verify, into=None), places)
    elif places is None:  # everything on the CPU: the tree is decoded around the destinations, then filled
        into = readinto.allocate(doc, chosen)
        tensors = layout.tensors_from_entries(table, into)
        tree = _with_ranks(doc, decode_tree(doc, tensors), tensors)  # before any byte reaches a target
        if chosen:
            _verify_torch_rng(storage, name, doc)  # bytes torch would reject refuse it before the model changes
        readinto.read_entries(storage, name, doc, verify=verify, into=into, live=chosen)
        for record in chunks.chunked(table):  # assembled from copies of entries read only now
            chunks.fill(tensors[record["tensor"]], record, into)
    else:  # some tensors live on a GPU: checked on stand-ins first, decoded once their bytes are there
        check(doc)
        _verify_torch_rng(storage, name, doc)
        own = {**chosen, **todevice.allocate(entries, readinto.dtypes_of(entries[n.E_DTYPE]), places, chosen)}
        into = readinto.allocate(doc, own)
        on_device = {e for e, t in own.items() if t.is_cuda}
        read = readinto.read_entries(storage, name, doc, verify=verify, into=into, on_device=on_device, live=chosen)
        tree = _decode_placed(doc, read, places)
    rng.check_values(tree.get(n.TREE_RNG))
    for rank, own in enumerate(tree.get(n.M_RANKS) or []):
        try:
            rng.check_values(own.get(n.TREE_RNG))
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(f"rank {rank}: {exc}") from None
    return tree


def check_sizes(storage: Storage, name: str, doc: Mapping[str, Any]) -> None:
    """Refuse (CorruptCheckpointError) tensor files shorter than their entries' bytes, by their size alone:
    call it before allocating what a manifest declares, which may claim a terabyte."""
    for file, end in zip(doc[n.M_FILES], readinto.file_ends(doc), strict=True):
        where = f"{storage.root}/{n.file_path(name, file)}"
        try:
            size = storage.size(n.file_path(name, file))
        except StorageError as exc:
            raise CorruptCheckpointError(f"{where}: cannot be read ({exc}); the checkpoint is incomplete") from exc
        if size < end:
            raise CorruptCheckpointError(f"{where}: truncated ({size} bytes, its entries need {end})")


def _with_ranks(doc: Mapping[str, Any], tree: dict[str, Any], tensors: Sequence[Any],
                arrays: Sequence[Any] | None = None) -> dict[str, Any]:
    ranks = decode_ranks(doc, tensors, arrays)
    if ranks is not None:
        tree[n.M_RANKS] = ranks
    return tree


def _decode_placed(doc: Mapping[str, Any], read: list[torch.Tensor],
                   places: list[torch.device | None] | None) -> dict[str, Any]:
    """The tree of tensors ``read`` (per entry), each moved to its place; NumPy arrays from CPU copies."""
    table = doc[n.M_TENSORS]
    if places is None:
        tensors = layout.tensors_from_entries(table, read)
        return _with_ranks(doc, decode_tree(doc, tensors), tensors)
    placed = [t if place is None or t.device == place else t.to(place) for t, place in zip(read, places, strict=True)]
    arrays = _OnCpu(layout.tensors_from_entries(table, read))
    tensors = layout.tensors_from_entries(table, placed)
    return _with_ranks(doc, decode_tree(doc, tensors, arrays=arrays), tensors, arrays)


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
    spans.update(e for record in chunks.chunked(table) for e, _ in record["chunks"])  # pieces are assembled
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
    """Every problem found in checkpoint ``name`` (empty when intact); reads in bounded chunks.

    Checks what restoring it would check before reading (:func:`check`), then every byte.
    """
    try:
        doc = read_manifest(storage, name)
        check(doc)
        algo, entries = checksum.Algorithm(doc[n.M_CHECKSUM_ALGO]), doc[n.M_ENTRIES]
        by_file: list[list[int]] = [[] for _ in doc[n.M_FILES]]
        for e, k in enumerate(entries[n.E_FILE]):
            by_file[k].append(e)
        for k, (file, expected) in enumerate(zip(doc[n.M_FILES], doc[n.M_FILE_CHECKSUMS], strict=True)):
            _verify_file(storage, name, file, expected, algo, entries, by_file[k])
        _verify_torch_rng(storage, name, doc)
    except CorruptCheckpointError as exc:
        return [f"{storage.root}/{name}: {exc}" if not str(exc).startswith(storage.root) else str(exc)]
    return []


def _verify_torch_rng(storage: Storage, name: str, doc: Mapping[str, Any]) -> None:
    """The torch RNG states' bytes (the tree's, and each rank's in a v3 checkpoint), which restoring checks on
    a scratch generator (as :func:`read_tree` does)."""
    tree = doc.get(n.M_TREE)
    _verify_torch_state(storage, name, doc, tree.get(n.TREE_RNG) if isinstance(tree, dict) else None)
    if n.M_WORLD in doc:  # a distributed job's checkpoint (v3, or v4 with ranks)
        for rank, own in enumerate(doc[n.M_RANKS]):
            try:
                _verify_torch_state(storage, name, doc, own[n.TREE_RNG])
            except CorruptCheckpointError as exc:
                raise CorruptCheckpointError(f"rank {rank}: {exc}") from None


def _verify_torch_state(storage: Storage, name: str, doc: Mapping[str, Any], state: Any) -> None:
    ref = state.get("torch") if isinstance(state, dict) else None
    table, entries = doc[n.M_TENSORS], doc[n.M_ENTRIES]
    j = ref.get("$t") if isinstance(ref, dict) else None
    if type(j) is not int or any(v["tensor"] == j for v in table[n.T_VIEWS]):
        return  # no torch state, or one stored as a view: read_tree checks it
    e = table[n.T_ENTRY][j]
    file = doc[n.M_FILES][entries[n.E_FILE][e]]
    try:
        with storage.open_read(n.file_path(name, file)) as f:
            start, _ = read_header(f, storage.size(n.file_path(name, file)), file, parse=False)
            f.seek(start + entries[n.E_START][e])
            raw = f.read(entries[n.E_END][e] - entries[n.E_START][e])
    except StorageError as exc:
        raise CorruptCheckpointError(f"{file}: cannot be read ({exc})") from exc
    dtype = codec.dtype_from_name(entries[n.E_DTYPE][e])
    if e in compression.compressed(entries):
        out = torch.empty(entries[n.E_RAW][e], dtype=torch.uint8)
        compression.unpack_into(entries[n.E_CODEC][e], raw, out.numel(), dtype.itemsize, out.data_ptr(), file)
        raw = out.numpy().tobytes()
    rng.check_values({"torch": torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype)} if raw else {})


def _verify_file(storage: Storage, name: str, file: str, expected: checksum.Value, algo: checksum.Algorithm,
                 entries: Mapping[str, Any], mine: list[int]) -> None:
    where = f"{storage.root}/{n.file_path(name, file)}"
    try:
        size = storage.size(n.file_path(name, file))
        with storage.open_read(n.file_path(name, file)) as f:
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
