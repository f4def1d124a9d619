"""Load each file named on the command line under an address-space limit; print one JSON result per file.

Run by test_memory_bombs.py. After the imports, RLIMIT_AS is set to the process's
current size plus LIMIT_MB: an allocation of a bomb's size fails (MemoryError or a
torch allocation error), so a load that returns a clear savegame error instead
proves it refused before allocating. Arguments: ``kind:path`` with kind one of
pickle, torch, import, cli (``savegame migrate path --to <path>.run``).
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import sys

import numpy  # noqa: F401  (imported before the limit: its import allocates)
import torch  # noqa: F401

import savegame.cli
from savegame.migrate import import_checkpoint, restricted_unpickle, safe_torch_load

LIMIT_MB = 256


def vm_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))


def run(kind: str, path: str) -> dict[str, object]:
    if kind == "cli":
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                savegame.cli.main(["migrate", path, "--to", path + ".run"], prog_name="savegame")
            except SystemExit as exc:
                return {"exit": exc.code, "stderr": err.getvalue()}
        return {"exit": None, "stderr": err.getvalue()}
    load = {"pickle": restricted_unpickle, "torch": safe_torch_load, "import": import_checkpoint}[kind]
    try:
        load(path)
    except Exception as exc:  # noqa: BLE001 - reported, not handled: a MemoryError means the bomb went off
        return {"error": type(exc).__name__, "message": str(exc)}
    return {"error": None, "message": ""}


def main(args: list[str]) -> None:
    limit = vm_bytes() + LIMIT_MB * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for arg in args:
        kind, _, path = arg.partition(":")
        print(json.dumps({"arg": arg, **run(kind, path)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
