"""Memory bombs: tiny foreign files that ask for gigabytes are refused before anything is allocated.

Every bomb is loaded in one child process (_bomb_child.py) whose address space is
capped at its size after start-up plus 256 MiB (RLIMIT_AS): each bomb asks for at
least 1 GiB, so had savegame allocated it the load would fail with MemoryError
(or torch's allocation error). The assertions are on the error savegame raises
and what it says, never on time.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from savegame.errors import UnsafeCheckpointError
from savegame.migrate import import_checkpoint

CHILD = Path(__file__).with_name("_bomb_child.py")
REPO = Path(__file__).resolve().parents[2]
GIB = 2**30


class Call:
    """Pickles as ``func(*args)``."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> Any:
        return (self.func, self.args)


def pickle_of(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=2)


def newobj(cls: type, *args: Any) -> bytes:
    """A pickle of ``cls.__new__(cls, *args)`` (the NEWOBJ opcode), which pickle.dumps will not write for
    a class whose instances reduce otherwise."""
    body = pickle_of(args)[2:-1]  # the args tuple, without PROTO and STOP
    return b"\x80\x02c" + f"{cls.__module__}\n{cls.__qualname__}\n".encode() + body + b"\x81."


def as_torch_file(data_pkl: bytes, path: Path, *, compress: bool = False) -> Path:
    """A real torch.save zip whose data.pkl is replaced by ``data_pkl``."""
    torch.save([1], path)
    with zipfile.ZipFile(path) as zf:
        members = [(info.filename, zf.read(info)) for info in zf.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as zf:
        for name, content in members:
            zf.writestr(name, data_pkl if name.endswith("data.pkl") else content)
    return path


def nested_dag(depth: int) -> bytes:
    """A list holding the same list twice, ``depth`` levels deep: 2**depth leaves from ~10 bytes per level."""
    out = io.BytesIO(b"\x80\x02K\x01")  # the innermost value: 1
    out.seek(0, io.SEEK_END)
    for level in range(depth):
        out.write(b"r" + struct.pack("<I", level) + b"j" + struct.pack("<I", level) + b"\x86")  # (x, x)
    out.write(b".")
    return out.getvalue()


class StorageRef:
    """Pickled by LegacyPickler as a persistent id naming a FloatStorage of ``numel`` elements."""

    def __init__(self, numel: int) -> None:
        self.numel = numel


class LegacyPickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, StorageRef):
            return ("storage", torch.FloatStorage, "0", "cpu", obj.numel, None)
        return None


def legacy_file(path: Path, numel: int, size: tuple[int, ...], stride: tuple[int, ...]) -> Path:
    """A legacy (torch < 1.6) torch.save file, written as torch writes it, declaring a storage of ``numel``."""
    buf = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True,
                                                   "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(header, buf, protocol=2)
    tensor = Call(torch._utils._rebuild_tensor_v2, StorageRef(numel), 0, size, stride, False, OrderedDict())
    LegacyPickler(buf, protocol=2).dump({"w": tensor})
    pickle.dump(["0"], buf, protocol=2)
    buf.write(struct.pack("<q", 1) + struct.pack("<f", 1.0))  # one element of data follows
    path.write_bytes(buf.getvalue())
    return path


def build_bombs(d: Path) -> dict[str, tuple[str, str, str]]:
    """name -> (kind:path argument for the child, expected error, a fragment of its message)."""
    ndarray = Call(np.ndarray, (GIB,), "u1")
    bombs = {
        "pickle bytearray(N)": ("pickle", pickle_of(Call(bytearray, GIB)), "UnsafeCheckpointError", "bytearray(N)"),
        "pickle numpy.ndarray(N)": ("pickle", pickle_of(ndarray), "UnsafeCheckpointError", "numpy.ndarray"),
        "pickle NEWOBJ ndarray": ("pickle", newobj(np.ndarray, (GIB,), "u1"), "UnsafeCheckpointError",
                                  "numpy.ndarray"),
        "pickle huge memo index": ("pickle", b"\x80\x02]r\x61\x61\x0f\x0f.", "", ""),
        "pickle shared-list tree": ("pickle", nested_dag(64), "UnsafeCheckpointError", "unfold"),
        "pickle expanded tensor": ("pickle", pickle_of({"w": torch.ones(1).expand(GIB // 4)}),
                                   "UnsafeCheckpointError", "expanded view"),
        "torch bytearray(N)": ("torch", pickle_of(Call(bytearray, GIB)), "UnsafeCheckpointError", "bytearray(N)"),
        "torch numpy.ndarray(N)": ("torch", pickle_of(ndarray), "UnsafeCheckpointError", "numpy.ndarray"),
        "torch UntypedStorage(N)": ("torch", pickle_of(Call(torch.UntypedStorage, GIB)), "UnsafeCheckpointError",
                                    "UntypedStorage"),
        "torch FloatTensor(N)": ("torch", pickle_of(Call(torch.FloatTensor, GIB)), "UnsafeCheckpointError",
                                 "FloatTensor"),
        "torch NEWOBJ Tensor": ("torch", newobj(torch.Tensor, GIB), "UnsafeCheckpointError", "torch.Tensor"),
        "torch shared-list tree": ("torch", nested_dag(64), "UnsafeCheckpointError", "unfold"),
    }
    args: dict[str, tuple[str, str, str]] = {}
    for i, (name, (kind, data, error, fragment)) in enumerate(bombs.items()):
        path = d / f"bomb{i}.{'pkl' if kind == 'pickle' else 'pt'}"
        if kind == "pickle":
            path.write_bytes(data)
        else:
            as_torch_file(data, path)
        args[name] = (f"{kind}:{path}", error, fragment)
    deflated = as_torch_file(b"\x80\x02]." + b"\x00" * (GIB // 8), d / "zipbomb.pt", compress=True)
    args["torch zip bomb (deflated data.pkl)"] = (f"torch:{deflated}", "UnsafeCheckpointError", "data.pkl")
    torch.save({"w": torch.ones(1).expand(GIB // 4)}, d / "expand.pt")
    args["import expanded tensor"] = (f"import:{d / 'expand.pt'}", "UnsafeCheckpointError", "--max-bytes")
    liar = d / "liar.pt"
    torch.save({"w": torch.ones(4)}, liar)
    with zipfile.ZipFile(liar) as zf:
        members = [(i.filename, zf.read(i)) for i in zf.infolist()]
    with zipfile.ZipFile(liar, "w") as zf:
        for name, content in members:
            zf.writestr(name, content[:4] if name.endswith("data/0") else content)
    args["torch storage record shorter than declared"] = (f"torch:{liar}", "CorruptCheckpointError", "holds 4 bytes")
    legacy = legacy_file(d / "legacy.pt", GIB, (GIB,), (1,))
    args["legacy storage declaring 4 GiB"] = (f"torch:{legacy}", "UnsafeCheckpointError", "storage 0")
    expanded = legacy_file(d / "legacy_expand.pt", 1, (GIB // 4,), (0,))
    args["legacy expanded tensor"] = (f"torch:{expanded}", "UnsafeCheckpointError", "expanded view")
    return args


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    d = tmp_path_factory.mktemp("bombs")
    bombs = build_bombs(d)
    assert sorted(bombs) == sorted(NAMES)
    torch.save({"w": torch.ones(1).expand(GIB // 4)}, d / "cli_expand.pt")
    argv = [arg for arg, _, _ in bombs.values()] + [f"cli:{d / 'cli_expand.pt'}"]
    env = {**os.environ, "COLUMNS": "200"}
    child = subprocess.run([sys.executable, str(CHILD), *argv], capture_output=True, text=True, timeout=300,
                           env=env, cwd=REPO, check=False)
    assert child.returncode == 0, child.stderr
    by_arg = {r["arg"]: r for r in map(json.loads, child.stdout.splitlines())}
    out = {name: {**by_arg[arg], "expected": (error, fragment)} for name, (arg, error, fragment) in bombs.items()}
    out["cli"] = by_arg[f"cli:{d / 'cli_expand.pt'}"]
    return out


NAMES = [  # every bomb build_bombs writes
    "pickle bytearray(N)", "pickle numpy.ndarray(N)", "pickle NEWOBJ ndarray", "pickle huge memo index",
    "pickle shared-list tree", "pickle expanded tensor", "torch bytearray(N)", "torch numpy.ndarray(N)",
    "torch UntypedStorage(N)", "torch FloatTensor(N)", "torch NEWOBJ Tensor", "torch shared-list tree",
    "torch zip bomb (deflated data.pkl)", "import expanded tensor", "torch storage record shorter than declared",
    "legacy storage declaring 4 GiB", "legacy expanded tensor"]


@pytest.mark.parametrize("name", NAMES)
def test_bomb_is_refused_within_the_memory_limit(results: dict[str, dict[str, Any]], name: str) -> None:
    result = results[name]
    error, fragment = result["expected"]
    assert "MemoryError" not in f"{result['error']} {result['message']}", f"{name}: the allocation was attempted"
    assert (result["error"] or "") == error, result
    assert fragment in result["message"], result["message"]


def test_migrate_refuses_an_expanded_tensor_in_one_line(results: dict[str, dict[str, Any]]) -> None:
    cli = results["cli"]
    assert cli["exit"] == 2, cli
    [line] = cli["stderr"].strip().splitlines()
    assert line.startswith("savegame: error: ") and "expanded view" in line and "--max-bytes" in line


def test_max_bytes_sets_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "expand.pt"
    torch.save({"w": torch.ones(1).expand(2**20)}, path)  # 4 MiB once materialised, from a 1.5 KB file
    with pytest.raises(UnsafeCheckpointError, match=r"past 1048576 bytes, the limit you set with max_bytes"):
        import_checkpoint(path, max_bytes=2**20)
    imported = import_checkpoint(path, max_bytes=64 * 2**20)
    assert imported.tree["state"]["model"]["w"].shape == (2**20,)
