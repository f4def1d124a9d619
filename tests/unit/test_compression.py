"""The per-entry codec (savegame.format.compression), the v5 manifest rules and the compression option."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

import savegame
from savegame.errors import ConfigurationError, CorruptCheckpointError
from savegame.format import compression, manifest
from savegame.format import names as n

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int8,
          torch.uint8, torch.bool, torch.complex64]


def unpack(codec: str, blob, raw: int, itemsize: int) -> bytes:
    out = np.zeros(max(raw, 1), dtype=np.uint8)
    compression.unpack_into(codec, blob, raw, itemsize, out.ctypes.data, "test")
    return out[:raw].tobytes()


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(DTYPES), count=st.integers(0, 6000), smooth=st.booleans(), seed=st.integers(0, 2**16))
def test_any_entry_round_trips_exactly_whatever_codec_is_chosen(dtype, count, smooth, seed):
    gen = torch.Generator().manual_seed(seed)
    if smooth:  # compressible: few distinct values
        t = (torch.arange(count) % 7).to(dtype)
    else:
        t = torch.randint(0, 256, (count * dtype.itemsize,), dtype=torch.uint8, generator=gen).view(dtype)
    data = t.reshape(-1).view(torch.uint8).numpy().data
    codec, blob = compression.Packer().pack(data, dtype.itemsize)
    assert codec in n.CODECS
    if codec == n.CODEC_RAW:
        assert bytes(blob) == bytes(data)
        return
    assert len(blob) < compression.PAYS * len(data)
    assert unpack(codec, blob, len(data), dtype.itemsize) == bytes(data)


def test_small_and_incompressible_entries_stay_raw_and_smooth_floats_are_byte_grouped():
    packer = compression.Packer()
    small = torch.zeros(100).numpy().data
    noise = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8).numpy().data
    assert packer.pack(small, 4)[0] == n.CODEC_RAW and packer.pack(noise, 1)[0] == n.CODEC_RAW
    ramp = (torch.arange(1 << 14, dtype=torch.float32) / 7).numpy().data
    assert packer.pack(ramp, 4)[0] == n.CODEC_ZSTD_GROUPED
    assert packer.pack((torch.arange(1 << 14) % 3).to(torch.uint8).numpy().data, 1)[0] == n.CODEC_ZSTD


def test_the_expansion_bound_holds_for_the_densest_zstd_input():
    assert compression.MAX_EXPANSION == 32768
    for size in (1 << 17, 1 << 22):
        blob = zstandard.ZstdCompressor(level=19).compress(bytes(size))
        assert compression.check_bound(len(blob), size)
    assert not compression.check_bound(1, 32769) and compression.check_bound(1, 32768)


def test_a_frame_that_does_not_say_exactly_the_raw_size_is_refused_before_decompressing():
    raw = (torch.arange(1 << 14) % 3).to(torch.uint8).numpy().tobytes()
    blob = zstandard.ZstdCompressor().compress(raw)
    unknown = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
    for bad, size in ((blob, len(raw) + 1), (blob, len(raw) - 1), (unknown, len(raw)), (b"garbage!" * 4, 64),
                      (blob[:-3], len(raw)), (blob, len(raw) * 10**6)):
        with pytest.raises(CorruptCheckpointError):
            unpack(n.CODEC_ZSTD, bad, size, 1)
    with pytest.raises(CorruptCheckpointError):
        unpack("lz4", blob, len(raw), 1)
    with pytest.raises(CorruptCheckpointError, match="whole elements"):
        unpack(n.CODEC_ZSTD_GROUPED, zstandard.ZstdCompressor().compress(raw[:-1]), len(raw) - 1, 4)


def _manifest(version: int, entries: dict) -> bytes:
    body = {"format": "savegame", "format_version": version, "step": 1, "metrics": {}, "tree": {"state": {}},
            "tensors": {"entry": [0], "device": ["cpu"], "views": []}, "checksum": "xxh3_64",
            "files": ["tensors-00000.safetensors"], "file_checksums": ["0" * 16],
            "entries": {"file": [0], "dtype": ["float32"], "shape": [[4096]], "checksum": "0" * 16, **entries}}
    return manifest.dumps(body)


@pytest.mark.parametrize("version, entries, error", [
    (5, {"start": [0], "end": [100], "codec": ["zstd"], "raw": [16384]}, None),
    (5, {"start": [0], "end": [100], "codec": "zstd+bytegroup", "raw": [16384]}, None),
    (5, {"start": [0], "end": [16384], "codec": ["raw"], "raw": [16384]}, None),
    (2, {"start": [0], "end": [100], "codec": ["zstd"], "raw": [16384]}, "format version that has none"),
    (4, {"start": [0], "end": [100], "codec": ["zstd"], "raw": [16384]}, "format version that has none"),
    (5, {"start": [0], "end": [100]}, "malformed codec columns"),
    (5, {"start": [0], "end": [100], "codec": ["brotli"], "raw": [16384]}, "unknown codec 'brotli'"),
    (5, {"start": [0], "end": [100], "codec": ["zstd"], "raw": [16383]}, "entry 0 holds 16383 bytes"),
    (5, {"start": [0], "end": [100], "codec": ["raw"], "raw": [16384]}, "raw entry 0 holds 100 bytes"),
    (5, {"start": [0], "end": [0], "codec": ["zstd"], "raw": [16384]}, "more than zstd can produce"),
    (5, {"start": [0], "end": [100], "codec": ["zstd"], "raw": ["16384"]}, "malformed codec columns"),
    (5, {"start": [0], "end": [100], "codec": ["zstd"], "raw": [16384], "content": "0" * 16},
     "malformed content column"),  # (a content identity only where checksums are xxh3-128: incremental saves)
    (2, {"start": [0], "end": [16384], "content": "0" * 16}, "malformed content column"),
])
def test_v5_entry_codec_rules(version, entries, error):
    raw = _manifest(version, entries)
    if error is None:
        codecs = entries["codec"]
        assert manifest.loads(raw, "x")[n.M_ENTRIES][n.E_CODEC] == ([codecs] if isinstance(codecs, str) else codecs)
        return
    with pytest.raises(CorruptCheckpointError, match=error):
        manifest.loads(raw, "x")


def test_a_v5_manifest_of_a_distributed_job_is_refused():
    body = manifest.loads(_manifest(5, {"start": [0], "end": [100], "codec": ["zstd"], "raw": [16384]}), "x")
    body.update(world_size=1, ranks=[{"rng": {}, "state": {}}])
    body[n.M_ENTRIES][n.E_SUM] = "".join(body[n.M_ENTRIES][n.E_SUM])
    with pytest.raises(CorruptCheckpointError, match="distributed"):
        manifest.loads(manifest.dumps(body), "x")


@pytest.mark.parametrize("value", ["gzip", "ZSTD", True, 1, b"zstd"])
def test_an_unknown_compression_is_refused_naming_what_is_accepted(tmp_path, value):
    with pytest.raises(ConfigurationError, match="compression must be None or 'zstd'"):
        savegame.Checkpointer(tmp_path, {}, compression=value)
    assert not any(tmp_path.iterdir())


def test_compression_without_zstandard_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard now raises ImportError
    with pytest.raises(ConfigurationError, match=r"pip install 'savegame\[zstd\]'"):
        savegame.Checkpointer(tmp_path, {}, compression="zstd")
    savegame.Checkpointer(tmp_path, {}).close()  # the default needs nothing


def test_reading_a_compressed_checkpoint_without_zstandard_says_how_to_install_it(monkeypatch):
    from pathlib import Path

    golden = Path(__file__).parents[1] / "compat" / "data" / "v5" / "step-0000000007"
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(ConfigurationError, match=r"reading compressed checkpoints, need .*pip install 'savegame\[zstd\]'"):
        savegame.load(golden)
    savegame.load(golden.parents[1] / "v2" / "step-0000000007")  # plain checkpoints need nothing


def test_compression_in_a_distributed_job_is_refused_before_anything_else(tmp_path, monkeypatch):
    import savegame.checkpointer

    monkeypatch.setattr(savegame.checkpointer, "job_active", lambda: True)
    with pytest.raises(ConfigurationError, match="not supported for distributed jobs yet"):
        savegame.Checkpointer(tmp_path, {}, compression="zstd")
    assert not any(tmp_path.iterdir())
