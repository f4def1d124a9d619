"""The manifest: one JSON document per checkpoint, written last, checksummed.

It holds the format version, versions of the writers, step/epoch/metrics/extra,
the encoded value tree, every tensor record and every byte entry with its crc32.
``manifest_crc32`` is the last member; it is the CRC-32 of every byte before
``,"manifest_crc32":``, so a flipped bit anywhere in the manifest is caught, not
only one that breaks JSON, and checking it costs no second serialisation.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Mapping
from typing import Any

from savegame.errors import CorruptCheckpointError
from savegame.format import names as n

_FILE_RE = re.compile(r"tensors-\d{5}\.safetensors")


_CRC_MARK = b',"' + n.M_CHECKSUM.encode() + b'":'


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
    if type(version) is not int or version > n.FORMAT_VERSION or version < 1:
        raise CorruptCheckpointError(
            f"{where}: format version {version!r} is not supported by this savegame (reads 1..{n.FORMAT_VERSION}); "
            "upgrade savegame to read it"
        )
    doc.pop(n.M_CHECKSUM, None)
    _check_shape(doc, where)
    return doc


def _check_shape(doc: Mapping[str, Any], where: str) -> None:
    kinds: dict[str, type | tuple[type, ...]] = {
        n.M_STEP: int, n.M_METRICS: dict, n.M_TENSORS: list, n.M_ENTRIES: list, n.M_FILES: list,
    }
    for key, kind in kinds.items():
        if not isinstance(doc.get(key), kind) or isinstance(doc.get(key), bool):
            raise CorruptCheckpointError(f"{where}: manifest field {key!r} is missing or malformed")
    files = doc[n.M_FILES]
    if not all(isinstance(f, str) and _FILE_RE.fullmatch(f) for f in files):
        raise CorruptCheckpointError(f"{where}: manifest names an unexpected data file")
    for entry in doc[n.M_ENTRIES]:
        ok = isinstance(entry, dict) and entry.get("file") in files and isinstance(entry.get("key"), str)
        ok = ok and all(type(entry.get(k)) is int and entry[k] >= 0 for k in ("start", "end", "crc32"))
        if not ok or entry["start"] > entry["end"]:
            raise CorruptCheckpointError(f"{where}: malformed entry in manifest")
    header_crcs = doc.get(n.M_HEADER_CRCS)
    if not isinstance(header_crcs, list) or len(header_crcs) != len(files) or \
            not all(type(c) is int for c in header_crcs):
        raise CorruptCheckpointError(f"{where}: manifest field {n.M_HEADER_CRCS!r} is missing or malformed")
    for record in doc[n.M_TENSORS]:
        ok = isinstance(record, dict) and isinstance(record.get("dtype"), str) and type(record.get("entry")) is int
        if not ok or not isinstance(record.get("shape"), list):
            raise CorruptCheckpointError(f"{where}: malformed tensor record in manifest")
