"""atheris (libFuzzer) harness for savegame's readers of untrusted bytes.

    python tests/security/fuzz_atheris.py [libFuzzer flags] [CORPUS_DIR ...]

The first byte of each input picks the target, the rest is its input:

0  manifest reader      savegame.format.manifest.loads
1  tensor-file header   savegame.format.tensorfile.read_header
2  restricted unpickler savegame.migrate.restricted_unpickle (a plain pickle file)
3  safe foreign loader  savegame.migrate.safe_torch_load (the bytes as data.pkl of a torch.save zip)
4  legacy torch file    savegame.migrate.safe_torch_load (the bytes as a whole pre-1.6 file)

Each may raise a savegame error and nothing else; libFuzzer reports any other
exception, a crash, a hang (-timeout) or an allocation past -rss_limit_mb /
-malloc_limit_mb as a failure. test_fuzz_atheris.py runs it for a bounded number
of iterations from a seed corpus (write_corpus; SAVEGAME_FUZZ_SEED_CORPUS=DIR writes it first).
"""

from __future__ import annotations

import io
import os
import pickle
import sys
import tempfile
import zipfile
from pathlib import Path

import atheris
import numpy as np
import torch  # imported before instrumentation: only savegame's own code is instrumented

with atheris.instrument_imports(include=["savegame"]):
    from savegame.errors import SavegameError
    from savegame.format import manifest
    from savegame.format.tensorfile import read_header
    from savegame.migrate import restricted_unpickle, safe_torch_load

TARGETS = ("manifest", "header", "pickle", "torch", "legacy")
_WORK = Path(tempfile.mkdtemp(prefix="savegame-fuzz-"))
_TEMPLATE: list[tuple[str, bytes]] = []


def _zip_members() -> list[tuple[str, bytes]]:
    if not _TEMPLATE:
        path = _WORK / "template.pt"
        torch.save([1], path)
        with zipfile.ZipFile(path) as zf:
            _TEMPLATE.extend((info.filename, zf.read(info)) for info in zf.infolist())
    return _TEMPLATE


def as_torch_zip(data_pkl: bytes, path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, content in _zip_members():
            zf.writestr(name, data_pkl if name.endswith("data.pkl") else content)
    return path


def one_input(data: bytes) -> None:
    if not data:
        return
    target, body = TARGETS[data[0] % len(TARGETS)], data[1:]
    try:
        if target == "manifest":
            manifest.loads(body, "fuzz")
        elif target == "header":
            read_header(io.BytesIO(body), len(body), "fuzz")
        elif target == "pickle":
            path = _WORK / "input.pkl"
            path.write_bytes(body)
            restricted_unpickle(path)
        elif target == "torch":
            safe_torch_load(as_torch_zip(body, _WORK / "input.pt"))
        else:
            path = _WORK / "legacy.pt"
            path.write_bytes(body)
            safe_torch_load(path)
    except SavegameError:
        pass


def write_corpus(directory: Path) -> None:
    """Seed inputs: a valid one of each kind, so mutations start from real structure."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {"w": torch.arange(6.0).reshape(2, 3), "rng": np.random.RandomState(0).get_state(), "n": [1, 2.5, "x"]}
    legacy = io.BytesIO()
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    zipped = io.BytesIO()
    torch.save(state, zipped)
    with zipfile.ZipFile(zipped) as zf:
        data_pkl = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    seeds = {
        "manifest": b'{"format": "savegame", "format_version": 1, "step": 1}',
        "header": (8).to_bytes(8, "little") + b'{"a":{}}',
        "pickle": pickle.dumps({"random_state": (3, tuple(range(625)), None), "x": np.arange(3)}, protocol=2),
        "torch": data_pkl,
        "legacy": legacy.getvalue(),
    }
    for index, (name, body) in enumerate(seeds.items()):
        (directory / f"seed-{name}").write_bytes(bytes([TARGETS.index(name)]) + body)
        assert TARGETS[index] == name


def main() -> None:
    seed_dir = os.environ.get("SAVEGAME_FUZZ_SEED_CORPUS")
    if seed_dir:  # write the seeds first (then pass the same directory as the corpus)
        write_corpus(Path(seed_dir))
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
