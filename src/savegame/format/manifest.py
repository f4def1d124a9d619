"""The manifest: one JSON document per checkpoint, written last, checksummed.

It holds the format version, versions of the writers, step/epoch/metrics/extra,
the encoded value tree, and two tables: ``entries`` (byte ranges of the tensor
files, each with its checksum) and ``tensors`` (which entry each tensor of the
tree is, and where it lived). Since format v2 both tables are stored by column
(one JSON list per field), which keeps a checkpoint of 50,000 small tensors
cheap to write and to parse. ``manifest_crc32`` is the last member: the CRC-32
of every byte before ``,"manifest_crc32":``, so a flipped bit anywhere in the
manifest is caught, not only one that breaks JSON.

:func:`loads` validates everything and returns the manifest in the v2 shape
whatever version the file has, so readers handle one layout.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import math
import operator
import zlib
from collections.abc import Mapping
from typing import Any

from savegame.errors import CorruptCheckpointError
from savegame.format import checksum, chunks
from savegame.format import names as n
from savegame.format.codec import brief, stored_dtype
from savegame.format.compression import check_bound

MAX_BYTES = 2**63
"""Every dimension, and the bytes a shape would span with its zero dimensions counted as 1, stay below this
(torch's sizes are signed 64-bit)."""
_CRC_MARK = b',"' + n.M_CHECKSUM.encode() + b'":'
_ENTRY_COLUMNS = (n.E_FILE, n.E_DTYPE, n.E_SHAPE, n.E_START, n.E_END, n.E_SUM)


def dumps(body: Mapping[str, Any]) -> bytes:
    """Serialise a manifest body (compact JSON) and append its checksum as the last member."""
    raw = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    return raw[:-1] + _CRC_MARK + str(zlib.crc32(raw[:-1])).encode() + b"}"


def loads(raw: bytes, where: str) -> dict[str, Any]:
    """Parse and check a manifest; every problem is a CorruptCheckpointError naming ``where``."""
    cut = raw.rfind(_CRC_MARK)
    stored = raw[cut + len(_CRC_MARK):-1] if cut > 0 and raw.endswith(b"}") else b""
    if not stored.isdigit() or int(stored) != zlib.crc32(raw[:cut]):
        raise CorruptCheckpointError(f"{where}: manifest checksum mismatch or missing; the checkpoint is damaged")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{where}: manifest is not valid JSON ({exc}); the checkpoint is damaged") from exc
    if not isinstance(doc, dict) or doc.get(n.M_FORMAT) != n.FORMAT_NAME:
        raise CorruptCheckpointError(f"{where}: not a savegame manifest")
    version = doc.get(n.M_VERSION)
    if type(version) is not int or version > n.READABLE_VERSION or version < 1:
        raise CorruptCheckpointError(
            f"{where}: format version {version!r} is not supported by this savegame (reads 1..{n.READABLE_VERSION}); "
            "upgrade savegame to read it"
        )
    doc.pop(n.M_CHECKSUM, None)
    try:
        if version == 1:
            _upgrade_v1(doc)
        else:
            _expand(doc)
        _check(doc)
        if version == n.SHARDED_FORMAT_VERSION or (version == n.PACKED_FORMAT_VERSION and n.M_WORLD in doc):
            chunks.check(doc)
        elif version == n.COMPRESSED_FORMAT_VERSION and (n.M_WORLD in doc or n.M_RANKS in doc):
            raise CorruptCheckpointError("a compressed (v5) checkpoint of a distributed job is not supported")
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(f"{where}: {exc}; the checkpoint is damaged") from None
    return doc


def compact(body: dict[str, Any]) -> dict[str, Any]:
    """The on-disk form of a v2 body: a column whose values are all equal is stored once, as that
    value, and checksums as one string: 16 hex digits each, or for xxh3-128 (v4) the base64 of their
    16 bytes each, concatenated (21.3 characters an entry instead of 32). A v4 body also leaves out
    ``end``, which is always ``start`` plus the entry's size (dtype and shape). :func:`loads` undoes all."""
    out = dict(body)
    entries, tensors = dict(body[n.M_ENTRIES]), dict(body[n.M_TENSORS])
    for table, columns in ((entries, (n.E_FILE, n.E_DTYPE)), (tensors, (n.T_DEVICE,))):
        for column in columns:
            values = table[column]
            if values and values.count(values[0]) == len(values):
                table[column] = values[0]
    if n.E_CODEC in entries:
        codecs = entries[n.E_CODEC]
        if codecs and codecs.count(codecs[0]) == len(codecs):
            entries[n.E_CODEC] = codecs[0]
    for column in (n.E_SUM, n.E_CONTENT):  # (content: v5 incremental saves, digests like the checksums)
        if column in entries:
            entries[column] = "".join(entries[column])
            if body.get(n.M_CHECKSUM_ALGO) == checksum.XXH3_128:
                entries[column] = base64.b64encode(bytes.fromhex(entries[column])).decode()
    if body.get(n.M_VERSION, 0) == n.PACKED_FORMAT_VERSION:
        del entries[n.E_END]
    out[n.M_ENTRIES], out[n.M_TENSORS] = entries, tensors
    return out


def _expand(doc: dict[str, Any]) -> None:
    """Undo :func:`compact` in place (validation follows)."""
    entries, tensors = doc.get(n.M_ENTRIES), doc.get(n.M_TENSORS)
    if type(entries) is not dict or type(tensors) is not dict or type(entries.get(n.E_START)) is not list \
            or type(tensors.get(n.T_ENTRY)) is not list:
        raise CorruptCheckpointError("manifest tables are missing or malformed")
    count = len(entries[n.E_START])
    for column in (n.E_SUM, n.E_CONTENT) if n.E_CONTENT in entries else (n.E_SUM,):
        entries[column] = _digests(entries.get(column), count, doc.get(n.M_CHECKSUM_ALGO))
    columns = [(entries, n.E_FILE, count), (entries, n.E_DTYPE, count), (tensors, n.T_DEVICE, len(tensors[n.T_ENTRY]))]
    if n.E_CODEC in entries:
        columns.append((entries, n.E_CODEC, count))
    for table, column, size in columns:
        if type(table.get(column)) is not list:
            table[column] = [table.get(column)] * size
    if n.E_END not in entries and doc.get(n.M_VERSION) == n.PACKED_FORMAT_VERSION:
        entries[n.E_END] = _ends(entries)  # (the first v4 form stored it: read as well)


def _digests(sums: Any, count: int, algo: Any) -> list[str]:
    """A column of checksums (or content digests) as stored, one string, as a list of hex strings."""
    width = checksum.WIDTH.get(algo, 16) if type(algo) is str else 16  # (anything else is refused later)
    if algo == checksum.XXH3_128 and type(sums) is str and len(sums) != width * count:
        sums = _unpack_base64(sums, count)  # (32 hex digits an entry: the first v4 form, read as well)
    if type(sums) is not str or len(sums) != width * count:
        raise CorruptCheckpointError("malformed checksum column in manifest")
    return [sums[i:i + width] for i in range(0, len(sums), width)]


def _ends(entries: dict[str, Any]) -> list[int]:
    """The ``end`` column a v4 manifest leaves out: each entry's start plus its size (validation follows)."""
    starts, dtypes, shapes = entries[n.E_START], entries[n.E_DTYPE], entries.get(n.E_SHAPE)
    if type(shapes) is not list or len(shapes) != len(starts) or len(dtypes) != len(starts) \
            or not all(type(s) is list for s in shapes) or not _ints(starts) \
            or not _ints(list(itertools.chain.from_iterable(shapes))) or not all(type(d) is str for d in dtypes):
        raise CorruptCheckpointError("malformed entry table in manifest")
    itemsize = {name: stored_dtype(name).itemsize for name in set(dtypes)}
    return list(map(operator.add, starts, map(operator.mul, map(math.prod, shapes), map(itemsize.__getitem__, dtypes))))


def _unpack_base64(sums: str, count: int) -> str:
    """A v4 checksum column (base64 of 16 bytes an entry) as 32 hex digits an entry; malformed: ``""``."""
    try:
        raw = base64.b64decode(sums, validate=True)
    except (binascii.Error, ValueError):
        raise CorruptCheckpointError("malformed checksum column in manifest") from None
    return raw.hex() if len(raw) == 16 * count else ""


def _check(doc: dict[str, Any]) -> None:
    for key, kind in ((n.M_STEP, int), (n.M_METRICS, dict), (n.M_FILES, list), (n.M_ENTRIES, dict),
                      (n.M_TENSORS, dict), (n.M_FILE_CHECKSUMS, list)):
        if type(doc.get(key)) is not kind:
            raise CorruptCheckpointError(f"manifest field {key!r} is missing or malformed")
    _check_fields(doc)
    algo = checksum.Algorithm(doc.get(n.M_CHECKSUM_ALGO))  # type: ignore[arg-type]
    files = doc[n.M_FILES]
    packed = doc[n.M_VERSION] >= n.PACKED_FORMAT_VERSION  # v4, v5: files may be packs of the run's content store
    if not all(type(f) is str and (n.tensor_file_index(f) is not None or (packed and n.is_pack_file(f)))
               for f in files) or len(set(files)) < len(files):
        raise CorruptCheckpointError("manifest names an unexpected data file")
    if len(doc[n.M_FILE_CHECKSUMS]) != len(files) or not all(map(algo.is_value, doc[n.M_FILE_CHECKSUMS])):
        raise CorruptCheckpointError(f"manifest field {n.M_FILE_CHECKSUMS!r} is malformed")
    _check_entries(doc[n.M_ENTRIES], len(files), algo, doc[n.M_VERSION] == n.COMPRESSED_FORMAT_VERSION)
    content = doc[n.M_ENTRIES].get(n.E_CONTENT)
    if content is not None and (doc[n.M_VERSION] != n.COMPRESSED_FORMAT_VERSION or algo.name != checksum.XXH3_128
                                or not all(map(algo.is_value, content))):
        raise CorruptCheckpointError("malformed content column in manifest")
    _check_tensors(doc[n.M_TENSORS], doc[n.M_ENTRIES])


def _check_fields(doc: dict[str, Any]) -> None:
    """The scalar members: step, epoch, time, pinned and the writers' versions."""
    step, epoch, when = doc[n.M_STEP], doc.get(n.M_EPOCH), doc.get(n.M_TIME)
    if not 0 <= step < MAX_BYTES:
        raise CorruptCheckpointError(f"manifest field {n.M_STEP!r} is out of range")
    if epoch is not None and (type(epoch) is not int or not 0 <= epoch < MAX_BYTES):
        raise CorruptCheckpointError(f"manifest field {n.M_EPOCH!r} is malformed")
    # the range first: math.isfinite raises OverflowError on an int of hundreds of digits
    if when is not None and (type(when) not in (int, float) or abs(when) > 1e12 or not math.isfinite(when)):
        raise CorruptCheckpointError(f"manifest field {n.M_TIME!r} is malformed")
    if type(doc.get(n.M_PINNED, False)) is not bool:
        raise CorruptCheckpointError(f"manifest field {n.M_PINNED!r} is malformed")
    for key in (n.M_SAVEGAME_VERSION, n.M_TORCH_VERSION):
        if type(doc.get(key, "")) is not str:
            raise CorruptCheckpointError(f"manifest field {key!r} is malformed")


def _check_entries(entries: dict[str, Any], file_count: int, algo: checksum.Algorithm, coded: bool) -> None:
    columns = [entries.get(c) for c in _ENTRY_COLUMNS]
    if not all(type(c) is list for c in columns) or len({len(c) for c in columns}) > 1:  # type: ignore[arg-type]
        raise CorruptCheckpointError("malformed entry table in manifest")
    files, dtypes, shapes, starts, ends, sums = columns
    if files and not (_ints(files) and _ints(starts) and _ints(ends) and max(files) < file_count):  # type: ignore[arg-type]
        raise CorruptCheckpointError("malformed entry table in manifest")
    if not all(map(int.__le__, starts, ends)):  # type: ignore[arg-type]
        raise CorruptCheckpointError("malformed entry table in manifest")
    if algo.name not in checksum.WIDTH and not all(map(algo.is_value, sums)):  # type: ignore[arg-type]
        raise CorruptCheckpointError("malformed checksum in manifest")  # (v2+ sums are sliced from one string)
    if not all(type(d) is str for d in dtypes):  # type: ignore[union-attr]
        raise CorruptCheckpointError("malformed dtype in manifest")
    itemsize = {name: stored_dtype(name).itemsize for name in set(dtypes)}  # type: ignore[arg-type]
    if not all(type(s) is list for s in shapes) or not _ints(list(itertools.chain.from_iterable(shapes))):  # type: ignore[union-attr,arg-type]
        raise CorruptCheckpointError("malformed tensor shape in manifest")
    if ends and max(ends) >= MAX_BYTES:
        raise CorruptCheckpointError("an entry ends past 2**63 bytes")
    # Each entry's byte size is its element count times its element size; map() keeps this at
    # C speed (tens of nanoseconds an entry), since it runs on every load of every checkpoint.
    counts = list(map(math.prod, shapes))  # type: ignore[arg-type]
    sizes = list(map(operator.sub, ends, starts))  # type: ignore[arg-type]
    if coded or n.E_CODEC in entries or n.E_RAW in entries:  # v5 (and only v5): sizes before compression
        sizes = _raw_sizes(entries, sizes, coded)
    if list(map(operator.mul, counts, map(itemsize.__getitem__, dtypes))) != sizes:  # type: ignore[arg-type]
        e = next(e for e, (c, d, z) in enumerate(zip(counts, dtypes, sizes)) if c * itemsize[d] != z)  # type: ignore[arg-type]
        raise CorruptCheckpointError(f"entry {e} holds {sizes[e]} bytes, not {dtypes[e]} {_dims(shapes[e])}")  # type: ignore[index]
    if 0 in counts:  # zero dimensions do not excuse huge others
        for e in (e for e, c in enumerate(counts) if not c):
            if not _fits(shapes[e], itemsize[dtypes[e]]):  # type: ignore[index]
                raise CorruptCheckpointError(f"entry {e} has an impossible shape {_dims(shapes[e])}")  # type: ignore[index]


def _raw_sizes(entries: dict[str, Any], stored: list[int], coded: bool) -> list[int]:
    """The ``raw`` column of a v5 entry table, checked against the ``codec`` column and the stored sizes:
    a raw entry stores its bytes as they are; a compressed one cannot claim more than zstd can produce
    from its stored bytes (a bomb is refused before anything is allocated)."""
    codecs, raw = entries.get(n.E_CODEC), entries.get(n.E_RAW)
    if not coded:
        raise CorruptCheckpointError("entry codecs in a format version that has none")
    if type(codecs) is not list or type(raw) is not list or len(codecs) != len(stored) or len(raw) != len(stored) \
            or not _ints(raw):
        raise CorruptCheckpointError("malformed codec columns in manifest")
    for e, (codec, size, held) in enumerate(zip(codecs, raw, stored, strict=True)):
        if codec == n.CODEC_RAW:
            if size != held:
                raise CorruptCheckpointError(f"raw entry {e} holds {held} bytes, not {size}")
        elif codec not in n.CODECS:
            raise CorruptCheckpointError(f"entry {e} has an unknown codec {brief(codec)} (this savegame knows "
                                         f"{', '.join(n.CODECS)})")
        elif not check_bound(held, size):
            raise CorruptCheckpointError(f"compressed entry {e} declares {size} bytes from {held}: more than zstd "
                                         "can produce")
    return raw


def _fits(shape: list[int], itemsize: int) -> bool:
    """Whether torch can make a tensor of this shape (zero dimensions do not excuse huge others)."""
    return math.prod(d or 1 for d in shape) * itemsize < MAX_BYTES


def _dims(shape: list[int]) -> str:
    return str(shape) if len(shape) <= 8 and max(shape, default=0) < 2**64 else f"(a shape of {len(shape)} dimensions)"


def _check_tensors(tensors: dict[str, Any], entries: dict[str, Any]) -> None:
    entry, device, views = tensors.get(n.T_ENTRY), tensors.get(n.T_DEVICE), tensors.get(n.T_VIEWS)
    if type(entry) is not list or type(device) is not list or type(views) is not list or len(entry) != len(device):
        raise CorruptCheckpointError("malformed tensor table in manifest")
    if entry and not (_ints(entry) and max(entry) < len(entries[n.E_FILE])):
        raise CorruptCheckpointError("a tensor record points at a missing entry")
    if not all(type(d) is str for d in device):
        raise CorruptCheckpointError("malformed tensor table in manifest")
    for view in views:
        ok = type(view) is dict and type(view.get("tensor")) is int and 0 <= view["tensor"] < len(entry)
        if not ok or not _view_fits(view, entries, entry[view["tensor"]]):
            raise CorruptCheckpointError("malformed view record in manifest")


def _view_fits(view: dict[str, Any], entries: dict[str, Any], e: int) -> bool:
    """A strided view (dtype, shape, stride, byte offset) inside its entry, a uint8 span of bytes."""
    shape, stride, offset = view.get("shape"), view.get("stride"), view.get("offset")
    if type(shape) is not list or type(stride) is not list or len(shape) != len(stride) or type(offset) is not int:
        return False
    if not _ints([*shape, *stride, offset]) or max([*shape, *stride], default=0) >= MAX_BYTES:
        return False
    itemsize = stored_dtype(view.get("dtype")).itemsize
    if entries[n.E_DTYPE][e] != "uint8" or len(entries[n.E_SHAPE][e]) != 1 or not _fits(shape, itemsize):
        return False
    extent = sum((s - 1) * st for s, st in zip(shape, stride, strict=True)) + 1 if all(shape) else 0
    return offset % itemsize == 0 and offset + extent * itemsize <= entries[n.E_SHAPE][e][0]


def _ints(values: list[Any]) -> bool:
    """Every value is a non-negative int (not bool)."""
    return not values or (set(map(type, values)) == {int} and min(values) >= 0)


def _upgrade_v1(doc: dict[str, Any]) -> None:
    """Rewrite a v1 manifest (a list of dicts per table, CRC-32) into the v2 shape, in place."""
    files, entries, records = doc.get(n.M_FILES), doc.get(n.M_ENTRIES), doc.get(n.M_TENSORS)
    if type(files) is not list or type(entries) is not list or type(records) is not list:
        raise CorruptCheckpointError("manifest tables are missing or malformed")
    index = {f: i for i, f in enumerate(files) if type(f) is str}
    try:
        doc[n.M_ENTRIES] = {
            n.E_FILE: [index[e["file"]] for e in entries], n.E_DTYPE: [e["dtype"] for e in entries],
            n.E_SHAPE: [e["shape"] for e in entries], n.E_START: [e["start"] for e in entries],
            n.E_END: [e["end"] for e in entries], n.E_SUM: [e["crc32"] for e in entries],
        }
        views = [{"tensor": j, **{k: r[k] for k in ("dtype", "shape", "stride", "offset")}}
                 for j, r in enumerate(records) if "stride" in r]
        doc[n.M_TENSORS] = {n.T_ENTRY: [r["entry"] for r in records], n.T_DEVICE: [r["device"] for r in records],
                            n.T_VIEWS: views}
    except (KeyError, TypeError) as exc:
        raise CorruptCheckpointError(f"malformed v1 table in manifest ({exc!r})") from exc
    doc[n.M_FILE_CHECKSUMS] = doc.pop(n.M_HEADER_CRCS, None)
    doc[n.M_CHECKSUM_ALGO] = checksum.CRC32
