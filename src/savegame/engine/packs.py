"""An incremental save's manifest: its new packs plus the packs of earlier saves it references.

The writer lays out and writes the save's new entries as for any save, into new
packs of the content store (``data/<id>.safetensors``); :func:`reference` then
points every reused entry at the pack, byte range and checksum an earlier save
recorded, and makes the manifest a v4 one (v5 when it holds compressed entries, its own or
referenced: their codec, raw size and content identity come along). Every pack it names is checked to still
exist just before the commit, so a content store changed behind the writer's back
(a pack deleted by hand) fails the save rather than committing a broken checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from savegame.engine.dedup import Location
from savegame.errors import StorageError
from savegame.format import names as n
from savegame.storage.base import Storage


def reference(storage: Storage, body: dict[str, Any], reuse: Mapping[int, Location], *, fresh: bool) -> None:
    """Fill the entries of ``reuse`` into ``body`` (a manifest body the writer built); ``fresh``: new packs
    were written (their names are made durable here)."""
    files, file_sums = list(body[n.M_FILES]), list(body[n.M_FILE_CHECKSUMS])
    new = len(files)
    table = {column: list(values) for column, values in body[n.M_ENTRIES].items()}
    position = {f: k for k, f in enumerate(files)}
    coded = n.E_CODEC in table or any(loc.codec != n.CODEC_RAW for loc in reuse.values())
    if coded and n.E_CODEC not in table:  # a save that compressed nothing references compressed entries
        table[n.E_CODEC] = [n.CODEC_RAW] * len(table[n.E_START])
        table[n.E_RAW] = [end - start for start, end in zip(table[n.E_START], table[n.E_END], strict=True)]
        table[n.E_CONTENT] = list(table[n.E_SUM])
    for e, loc in reuse.items():
        k = position.get(loc.file)
        if k is None:
            k = position[loc.file] = len(files)
            files.append(loc.file)
            file_sums.append(loc.file_sum)
        table[n.E_FILE][e], table[n.E_START][e], table[n.E_END][e] = k, loc.start, loc.end
        table[n.E_SUM][e] = loc.digest
        if coded:
            raw = loc.codec == n.CODEC_RAW
            table[n.E_CODEC][e] = loc.codec
            table[n.E_RAW][e] = loc.end - loc.start if raw else loc.raw
            table[n.E_CONTENT][e] = loc.digest if raw else loc.content
    version = n.PACKED_FORMAT_VERSION
    if coded and any(c != n.CODEC_RAW for c in table[n.E_CODEC]):
        version = n.COMPRESSED_FORMAT_VERSION  # (v5 with packs: compressed entries in the content store)
    else:
        for column in (n.E_CODEC, n.E_RAW, n.E_CONTENT):
            table.pop(column, None)
    for file in files[new:]:
        if not storage.exists(file):
            raise StorageError(f"{storage.root}/{file}: a pack this save references has disappeared from the "
                               "content store (deleted outside savegame?); the save was not committed, and the "
                               "next one writes every tensor again")
    if fresh:
        storage.fsync_dir(n.DATA_DIR)
    body.update({n.M_VERSION: version, n.M_FILES: files, n.M_FILE_CHECKSUMS: file_sums,
                 n.M_ENTRIES: table})
