"""docs/format.md is enough to read a checkpoint: an independent reader, without savegame, agrees with it."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
import xxhash

import savegame

CRC_MARK = b',"manifest_crc32":'


def column(table: dict, name: str, count: int) -> list:
    value = table[name]
    return value if isinstance(value, list) else [value] * count


def read_by_the_spec(ckpt: Path) -> dict[int, np.ndarray]:
    """Every compact tensor of a v2 checkpoint, by tensor number, as raw little-endian arrays."""
    raw = (ckpt / "manifest.json").read_bytes()
    cut = raw.rfind(CRC_MARK)
    assert int(raw[cut + len(CRC_MARK):-1]) == zlib.crc32(raw[:cut])
    doc = json.loads(raw)
    assert doc["format"] == "savegame" and doc["format_version"] in (2, 5) and doc["checksum"] == "xxh3_64"
    entries = doc["entries"]
    count = len(entries["start"])
    files, sums = column(entries, "file", count), entries["checksum"]
    data = {}
    for k, name in enumerate(doc["files"]):
        blob = (ckpt / name).read_bytes()
        (length,) = struct.unpack("<Q", blob[:8])
        assert xxhash.xxh3_64_hexdigest(blob[:8 + length]) == doc["file_checksums"][k]
        assert (8 + length) % 64 == 0
        data[k] = blob[8 + length:]
    numpy_dtype = {"float32": "<f4", "int64": "<i8", "uint8": "u1", "float64": "<f8", "bool": "?"}
    views = {v["tensor"] for v in doc["tensors"]["views"]}
    out = {}
    for j, e in enumerate(doc["tensors"]["entry"]):
        start, end = entries["start"][e], entries["end"][e]
        chunk = data[files[e]][start:end]
        assert xxhash.xxh3_64_hexdigest(chunk) == sums[16 * e:16 * e + 16]
        dtype = column(entries, "dtype", count)[e]
        if doc["format_version"] == 5:  # version 5: the stored bytes may be a zstd frame, of grouped bytes
            chunk = decode(column(entries, "codec", count)[e], chunk, entries["raw"][e],
                           np.dtype(numpy_dtype.get(dtype, "u1")).itemsize)
        if j not in views and dtype in numpy_dtype:
            out[j] = np.frombuffer(chunk, dtype=numpy_dtype[dtype]).reshape(entries["shape"][e])
    return out


def decode(codec: str, stored: bytes, raw: int, itemsize: int) -> bytes:
    """An entry's bytes from its stored bytes, as docs/format.md's version 5 says."""
    import zstandard

    if codec == "raw":
        return stored
    assert zstandard.get_frame_parameters(stored).content_size == raw
    out = zstandard.ZstdDecompressor().decompress(stored, max_output_size=raw)
    if codec == "zstd":
        return out
    assert codec == "zstd+bytegroup"
    planes = np.frombuffer(out, dtype=np.uint8).reshape(itemsize, raw // itemsize)  # byte b of element j: b*n + j
    return planes.T.tobytes()


def test_an_independent_reader_following_the_spec_reads_a_compressed_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(64, 64).mul(16).round().div(64))
    with savegame.Checkpointer(tmp_path, state={"model": model}, compression="zstd") as ckpt:
        ckpt.save(5)
    ckpt_dir = tmp_path / "step-0000000005"
    doc = json.loads((ckpt_dir / "manifest.json").read_bytes())
    assert doc["format_version"] == 5 and "zstd+bytegroup" in doc["entries"]["codec"]
    by_spec = read_by_the_spec(ckpt_dir)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(by_spec[doc["tree"]["state"]["model"][key]["$t"]], value.numpy())


def test_an_independent_reader_following_the_spec_gets_the_same_tensors(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    with savegame.Checkpointer(tmp_path, state={"model": model}) as ckpt:
        ckpt.save(5)
    ckpt_dir = tmp_path / "step-0000000005"
    by_spec = read_by_the_spec(ckpt_dir)
    tree = json.loads((ckpt_dir / "manifest.json").read_bytes())["tree"]
    loaded = savegame.load(ckpt_dir)
    for key, value in model.state_dict().items():
        j = tree["state"]["model"][key]["$t"]
        np.testing.assert_array_equal(by_spec[j], value.numpy())
        assert torch.equal(loaded["state"]["model"][key], value)
